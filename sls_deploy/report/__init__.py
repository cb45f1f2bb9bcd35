"""Rendering report.json as terminal summary, Markdown and HTML, with plots."""
