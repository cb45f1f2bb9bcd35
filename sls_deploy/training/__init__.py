"""The training loop shared by base training, searches and finetuning, and its losses."""
