"""docs/examples/awx/: the controller playbook (awx.awx) and the project's
playbooks, checked against the real awx.awx collection.

awx.awx comes from the ``ansible`` wheel on PyPI (tools/awx_collection.py,
cached under ~/.cache/haven-dr/collections/); a test fails, never skips,
when it cannot be had. ``ansible-playbook --syntax-check`` does not look at
module arguments, so every task's arguments are also checked against the
module's own documentation (``ansible-doc --json``: option names and
aliases, suboptions, choices, required options): a misspelt option fails.
ansible-lint (production profile) runs on the same files with awx.awx on
the path (`make lint` leaves docs/examples/awx/ out: it has no awx.awx).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from ansible.playbook.task import Task
from plays import BIN, ROOT

sys.path.insert(0, str(ROOT / "tools"))
import awx_collection

EXAMPLES = ROOT / "docs" / "examples" / "awx"
CONTROLLER = EXAMPLES / "controller.yml"
PROJECT = EXAMPLES / "project"
# haven.dr's playbooks, one job template each (playbooks/<name>.yml).
PLAYBOOKS = ["install", "protect", "drill", "failover", "failback"]
TASK_KEYWORDS = set(Task.fattributes) | {"local_action", "action", "with_items", "with_dict"}


@pytest.fixture(scope="module")
def awx_path() -> Path:
    try:
        return awx_collection.awx_collection()
    except awx_collection.FetchError as exc:
        pytest.fail(f"awx.awx is needed (tools/awx_collection.py): {exc}")


@pytest.fixture(scope="module")
def env(awx_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """awx.awx from the cache and haven.dr as a link to this checkout."""
    tmp = tmp_path_factory.mktemp("awx")
    haven = tmp / "collections" / "ansible_collections" / "haven"
    haven.mkdir(parents=True)
    (haven / "dr").symlink_to(ROOT)
    return {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "HAVEN_"))} | {
        "ANSIBLE_COLLECTIONS_PATH": f"{awx_path}:{tmp / 'collections'}",
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "HOME": str(tmp),  # ansible-lint's caches, not the user's
    }


def run(env: dict[str, str], *argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def playbooks() -> list[Path]:
    """The project's playbooks whose haven.dr playbook exists (all, once
    playbooks/ has them) and the controller playbook."""
    present = [
        PROJECT / f"{name}.yml"
        for name in PLAYBOOKS
        if (ROOT / "playbooks" / f"{name}.yml").is_file()
    ]
    return [CONTROLLER, PROJECT / "drill_report.yml", PROJECT / "drill_failed.yml", *present]


def load(path: Path) -> list[dict[str, Any]]:
    return yaml.load(path.read_text(), Loader=_Loader)


class _Loader(yaml.SafeLoader):
    """Reads ``!unsafe`` (the controller's own templates) as a plain string."""


_Loader.add_constructor("!unsafe", lambda loader, node: loader.construct_scalar(node))


def tasks(path: Path) -> list[dict[str, Any]]:
    return [t for play in load(path) for t in play.get("tasks", [])]


def module_of(task: dict[str, Any]) -> str:
    (module,) = [k for k in task if k not in TASK_KEYWORDS]
    return module


@cache
def module_doc(env_items: tuple[tuple[str, str], ...], module: str) -> dict[str, Any]:
    """The module's DOCUMENTATION as ansible-doc gives it; fails on an unknown module."""
    proc = run(dict(env_items), str(BIN / "ansible-doc"), "--json", "-t", "module", module)
    assert proc.returncode == 0, f"ansible-doc {module}: {proc.stderr}"
    doc = json.loads(proc.stdout)
    assert module in doc, f"ansible-doc knows no {module}: {proc.stdout[:500]}"
    return doc[module]["doc"]


def templated(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def check_args(args: Any, options: dict[str, Any], where: str) -> list[str]:
    """What is wrong with ``args`` against ``options`` (a DOCUMENTATION's)."""
    if templated(args):
        return []  # the whole value comes from a template: nothing to check here
    if not isinstance(args, dict):
        return [f"{where}: {args!r} is not a mapping of options"]
    errors = []
    names = {}
    for name, spec in options.items():
        names[name] = name
        for alias in spec.get("aliases", []):
            names[alias] = name
    for key, value in args.items():
        if key not in names:
            errors.append(f"{where}: no option {key!r} (known: {', '.join(sorted(options))})")
            continue
        spec = options[names[key]]
        if spec.get("choices") and not templated(value):
            values = value if isinstance(value, list) else [value]
            errors += [
                f"{where}.{key}: {v!r} not in {spec['choices']}"
                for v in values
                if v not in spec["choices"]
            ]
        sub = spec.get("suboptions")
        if sub:
            if spec.get("type") == "list" and isinstance(value, list):
                for i, item in enumerate(value):
                    errors += check_args(item, sub, f"{where}.{key}[{i}]")
            elif spec.get("type") == "dict":
                errors += check_args(value, sub, f"{where}.{key}")
    for name, spec in options.items():
        if spec.get("required") and not ({name, *spec.get("aliases", [])} & set(args)):
            errors.append(f"{where}: required option {name!r} missing")
    return errors


def task_errors(env: dict[str, str], path: Path) -> list[str]:
    items = tuple(sorted(env.items()))
    errors = []
    for task in tasks(path):
        module = module_of(task)
        assert "." in module, f"{path.name}: {task.get('name')}: {module} is not an FQCN"
        doc = module_doc(items, module)
        errors += check_args(task[module], doc.get("options", {}), f"{path.name}: {module}")
    return errors


def test_the_awx_collection_is_the_one_of_ansible_12(awx_path: Path) -> None:
    manifest = json.loads((awx_path / "ansible_collections/awx/awx/MANIFEST.json").read_text())
    assert manifest["collection_info"]["namespace"] == "awx"
    assert awx_collection.ANSIBLE_VERSION.startswith("12.")
    marker = json.loads((awx_path / awx_collection.MARKER).read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", marker["sha256"])


def test_syntax_check(env: dict[str, str]) -> None:
    for path in playbooks():
        proc = run(env, str(BIN / "ansible-playbook"), "--syntax-check", str(path), cwd=path.parent)
        assert proc.returncode == 0, f"{path}: {proc.stdout}\n{proc.stderr}"


def test_task_arguments_are_the_modules_options(env: dict[str, str]) -> None:
    used = {module_of(t) for t in tasks(CONTROLLER)}
    assert used >= {
        f"awx.awx.{m}"
        for m in (
            "credential_type",
            "credential",
            "project",
            "execution_environment",
            "job_template",
            "schedule",
            "workflow_job_template",
            "notification_template",
        )
    }
    errors = [
        e
        for path in playbooks()
        if path.parent == EXAMPLES or path.parent == PROJECT
        for e in task_errors(env, path)
    ]
    assert not errors, "\n".join(errors)


def test_a_wrong_option_name_is_caught(env: dict[str, str], tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt option, a nested one, a bad
    choice and a missing required option are each reported."""
    play = load(CONTROLLER)
    by_module = {module_of(t): t for t in play[0]["tasks"]}
    project = by_module["awx.awx.project"]["awx.awx.project"]
    project["scm_ulr"] = project.pop("scm_url")
    workflow = by_module["awx.awx.workflow_job_template"]["awx.awx.workflow_job_template"]
    workflow["workflow_nodes"][0]["related"]["succes_nodes"] = []
    by_module["awx.awx.job_template"]["awx.awx.job_template"]["job_type"] = "execute"
    del by_module["awx.awx.schedule"]["awx.awx.schedule"]["name"]
    broken = tmp_path / "controller.yml"
    broken.write_text(yaml.safe_dump(play))
    errors = "\n".join(task_errors(env, broken))
    assert "no option 'scm_ulr'" in errors
    assert "workflow_nodes[0].related: no option 'succes_nodes'" in errors
    assert "job_type: 'execute' not in" in errors
    assert "awx.awx.schedule: required option 'name' missing" in errors


def test_ansible_lint_production(env: dict[str, str], tmp_path: Path) -> None:
    """The repository's ansible-lint configuration, without its exclusion of
    docs/examples/awx/ (no awx.awx under `make lint`) and offline."""
    config = yaml.safe_load((ROOT / ".ansible-lint").read_text())
    assert "docs/examples/awx/" in config["exclude_paths"]
    config["exclude_paths"].remove("docs/examples/awx/")
    config["offline"] = True
    (tmp_path / "ansible-lint.yml").write_text(yaml.safe_dump(config))
    files = [str(p.relative_to(ROOT)) for p in playbooks()]
    proc = run(
        env,
        str(BIN / "ansible-lint"),
        "--profile",
        "production",
        "-c",
        str(tmp_path / "ansible-lint.yml"),
        *files,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert f"{len(files)} files processed" in proc.stderr + proc.stdout


def test_job_templates_and_the_workflow_fit_together() -> None:
    play = load(CONTROLLER)[0]
    variables = yaml.safe_load((EXAMPLES / "vars.yml").read_text())
    by_module: dict[str, list[dict[str, Any]]] = {}
    for task in play["tasks"]:
        by_module.setdefault(module_of(task), []).append(task)
    assert play["vars"]["haven_awx_playbooks"] == PLAYBOOKS
    # One job template per playbook, each a wrapper of haven.dr.<name>.
    (per_playbook, others) = by_module["awx.awx.job_template"]
    assert per_playbook["awx.awx.job_template"]["playbook"] == "{{ item }}.yml"
    for name in PLAYBOOKS:
        (wrapper,) = load(PROJECT / f"{name}.yml")
        assert wrapper["ansible.builtin.import_playbook"] == f"haven.dr.{name}"
    templates = {f"haven.dr {n}" for n in PLAYBOOKS} | {
        i["name"] for i in others["loop"] if (PROJECT / i["playbook"]).is_file()
    }
    # The workflow: drill -> report, either failing -> notify; every node a template above.
    (wf,) = by_module["awx.awx.workflow_job_template"]
    nodes = {n["identifier"]: n for n in wf["awx.awx.workflow_job_template"]["workflow_nodes"]}
    assert set(nodes) == {"drill", "report", "notify"}
    assert {n["unified_job_template"]["name"] for n in nodes.values()} <= templates
    assert nodes["drill"]["unified_job_template"]["name"] == "haven.dr drill"
    assert nodes["drill"]["related"] == {
        "success_nodes": [{"identifier": "report"}],
        "failure_nodes": [{"identifier": "notify"}],
    }
    assert nodes["report"]["related"] == {"failure_nodes": [{"identifier": "notify"}]}
    notify = {
        n["awx.awx.notification_template"]["name"]
        for n in by_module["awx.awx.notification_template"]
    }
    assert set(wf["awx.awx.workflow_job_template"]["notification_templates_error"]) <= notify
    # The weekly schedule of that workflow.
    (schedule,) = by_module["awx.awx.schedule"]
    assert (
        schedule["awx.awx.schedule"]["unified_job_template"]
        == wf["awx.awx.workflow_job_template"]["name"]
    )
    assert re.fullmatch(
        r"DTSTART:\d{8}T\d{6}Z RRULE:FREQ=WEEKLY;INTERVAL=1;BYDAY=(MO|TU|WE|TH|FR|SA|SU)",
        variables["haven_awx_drill_rrule"],
    )
    # The credential type injects what the modules read (plugins/module_utils/_argspec.py).
    (node_type, _recovery) = by_module["awx.awx.credential_type"]
    injectors = node_type["awx.awx.credential_type"]["injectors"]
    assert set(injectors["env"]) == {"HAVEN_URL", "HAVEN_TOKEN", "HAVEN_CA_PATH"}
    assert "tower.filename.ca_cert" in injectors["env"]["HAVEN_CA_PATH"]
    assert set(injectors["file"]) == {"template.ca_cert"}
    argspec = (ROOT / "plugins/module_utils/_argspec.py").read_text()
    for name in injectors["env"]:
        assert f'"{name}"' in argspec
