"""A family: several bundles of one model at different budgets, built from one base, in one folder.

``family.json`` names the model, the recipe, the base weights and the members (budget, folder). Each member is a
complete bundle (``b0.25/``, ``b0.40/``, ...), so every single-bundle command (validate, engine, upscale) works on
it, and each is checked against its own manifest; a member is a plain folder name inside the family folder (never a
path or a link elsewhere). The adaptive stage (``route``) reads the family and adds routers next to the members;
family.json then records the sha256 of each file route wrote (``files``), and ``engine FAMILY`` builds router
engines only from files that match (``Family.verify``), as a bundle's manifest does for its own files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sls_deploy.adaptive.nested import NESTED_DIR, SHARED, prepare_nested
from sls_deploy.core.atomic import write_json
from sls_deploy.core.bundle import verify_recorded
from sls_deploy.core.errors import BundleError, short_repr
from sls_deploy.core.safe_json import load_json

FAMILY = "family.json"
KIND = "sls-deploy family"


def member_dir(budget: float) -> str:
    return f"b{budget:.2f}"


@dataclass(frozen=True)
class FamilyMember:
    budget: float
    folder: str


@dataclass(frozen=True)
class Family:
    root: Path
    model: str
    method: str
    base_weights: str
    members: tuple[FamilyMember, ...]
    nested: dict[str, Any] | None = None  # a nested family (one shared weight set): how it was made
    files: dict[str, str] = field(default_factory=dict)  # sha256 of the family's own files (route's outputs)

    def path(self, member: FamilyMember) -> Path:
        return self.root / member.folder

    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, "model": self.model, "method": self.method, "base_weights": self.base_weights,
                "members": [{"budget": m.budget, "folder": m.folder} for m in self.members],
                **({"nested": self.nested} if self.nested else {}), **({"files": self.files} if self.files else {})}

    def save(self) -> None:
        write_json(self.root / FAMILY, self.to_json())

    def verify(self, names) -> None:
        """Each named file of the family folder exists and matches the sha256 family.json records for it."""
        verify_recorded(self.root, self.files, names, f"family {self.root}", FAMILY,
                        f"written by an older sls-deploy or not by route; run `sls-deploy route {self.root}` again")


def plain_folder_name(name: Any) -> bool:
    """A member folder: one plain name inside the family folder (no path, no '..', nothing absolute)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and PurePosixPath(name).name == name
            and "\\" not in name and "\0" not in name)


def check_budgets(budgets) -> tuple[float, ...]:
    """Distinct budgets, ascending; two budgets that would share a folder name are refused."""
    out = tuple(sorted(set(float(b) for b in budgets)))
    names = [member_dir(b) for b in out]
    if len(set(names)) != len(names):
        raise BundleError(f"budgets {', '.join(f'{b:g}' for b in out)} give the same member folder twice "
                          "(folders are named by two decimals)")
    return out


def is_family(root: Path) -> bool:
    return (Path(root) / FAMILY).is_file()


def load_family(root: str | Path) -> Family:
    """The family at ``root``, every member folder checked to exist (one-line BundleError otherwise)."""
    root = Path(root)
    f = root / FAMILY
    if not f.is_file():
        raise BundleError(f"{root} is not a family folder (no {FAMILY}; build one with "
                          "`sls-deploy build --budget A --budget B ...`)")
    d = load_json(f, "family file")
    try:
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if d.get("kind") != KIND:
            raise ValueError(f"kind is {short_repr(d.get('kind'))}")
        for m in d["members"]:
            if not plain_folder_name(m["folder"]):
                raise ValueError(f"member folder {short_repr(m['folder'])} is not a plain folder name inside the "
                                 "family folder")
        members = tuple(FamilyMember(float(m["budget"]), str(m["folder"])) for m in d["members"])
        nested = d.get("nested")
        if nested is not None and not isinstance(nested, dict):
            raise ValueError("its nested record is not an object")
        files = d.get("files", {})
        if not isinstance(files, dict) or not all(plain_folder_name(k) and isinstance(v, str)
                                                  for k, v in files.items()):
            raise ValueError("its files record is not a mapping of file names to sha256s")
        fam = Family(root, str(d["model"]), str(d.get("method", "")), str(d.get("base_weights", "")), members,
                     nested, files)
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{f} is not a valid family file ({e})") from None
    if not members:
        raise BundleError(f"{f} lists no members")
    for m in members:
        if (root / m.folder).is_symlink():
            raise BundleError(f"family member {m.folder} in {root} is a link: members are folders inside the "
                              "family folder (refused, nothing was read)")
        if not (root / m.folder).is_dir():
            raise BundleError(f"family member {m.folder} is missing from {root}")
    return fam


def _check_out(out: Path, model: str) -> Family | None:
    """The folder may be new, a family of the same model, or hold only member folders of an interrupted family
    build; anything else is refused before any work."""
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} is a file, not a folder")
    if not out.exists():
        return None
    if is_family(out):
        fam = load_family(out)
        if fam.model != model:
            raise BundleError(f"{out} holds a family of {fam.model}, not {model}")
        return fam
    stray = [p.name for p in out.iterdir() if not (p.is_dir() and p.name.startswith("b"))
             and p.name not in (SHARED, NESTED_DIR)]
    if stray:
        raise BundleError(f"{out} is not empty and not a family folder (it holds {', '.join(sorted(stray)[:3])}); "
                          "choose another --out")
    return None


def build_family(recipe, budgets, out: Path, settings_for, log, progress: bool = True,
                 nested: bool = False) -> dict[str, dict]:
    """``sls-deploy build --budget A --budget B ...``: one complete bundle per budget, in ``out/b<budget>``, each
    from the same base weights with the same options; ``family.json`` is written when every member is done (an
    interrupted family build resumes member by member when the same command runs again). Members are built
    independently, unless ``nested``: then their kept units are nested and their weights are one shared set
    trained under every member's mask (``adaptive.nested``). Returns {member folder: its report}."""
    from sls_deploy.core import distributed as dist
    from sls_deploy.stages.build import build, start

    out = Path(out)
    budgets = check_budgets(budgets)
    if len(budgets) < 2:
        raise BundleError("a family needs at least two distinct budgets")
    previous = _check_out(out, recipe.name)
    settings = {b: settings_for(b) for b in budgets}  # every option checked before any work
    methods = {s.method for s in settings.values()}
    w = settings[budgets[0]].weights
    base = str(Path(w).resolve()) if w else ""
    record = None
    if nested:
        if dist.world_size() > 1:
            raise BundleError("a nested family trains in one process (no torchrun)")
        out.mkdir(parents=True, exist_ok=True)
        settings, record = prepare_nested(recipe, settings, out, member_dir, log, progress)
    reports = {}
    for b in budgets:
        log(f"family member {member_dir(b)} ({budgets.index(b) + 1}/{len(budgets)})")
        rep = build(start(recipe, settings[b], out / member_dir(b), log, progress))
        if rep:
            reports[member_dir(b)] = rep
    if not dist.is_main():
        return {}
    members = {m.folder: m for m in (previous.members if previous else ())}
    members.update({member_dir(b): FamilyMember(b, member_dir(b)) for b in budgets})
    Family(out, recipe.name, "/".join(sorted(methods)), str(base),
           tuple(sorted(members.values(), key=lambda m: m.budget)), record,
           previous.files if previous else {}).save()  # route's records stay with its files
    log(f"family of {len(members)} members -> {out} (next: `sls-deploy route {out}`)")
    return reports
