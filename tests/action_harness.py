"""Runs the composite action (action.yml) the way a GitHub runner does: its ``run`` steps in
order, each as ``bash --noprofile --norc -eo pipefail FILE``, with the runner's file-based
environment (``GITHUB_OUTPUT``, ``GITHUB_ENV``, ``GITHUB_STEP_SUMMARY``) in temporary files
and the ``${{ ... }}`` expressions the action uses. ``uses`` steps (setup-python) are the
runner's business: the harness provides their result, a Python on ``PATH``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / "action.yml"
_EXPRESSION = re.compile(r"\$\{\{\s*(.+?)\s*\}\}")


def load_action(path: Path = ACTION) -> dict[str, Any]:
    action: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return action


@dataclass
class StepResult:
    name: str
    ran: bool
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""


@dataclass
class Job:
    """One job's use of the action: its inputs, environment and what each step did."""

    workdir: Path
    inputs: Mapping[str, str]
    environ: Mapping[str, str]
    steps: list[StepResult] = field(default_factory=list)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)  # step id -> outputs
    summary: str = ""
    env_added: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(s.ran and s.returncode != 0 for s in self.steps)

    def step(self, name: str) -> StepResult:
        return next(s for s in self.steps if s.name == name)

    def text(self) -> str:
        """Everything the job printed or wrote to the runner's files."""
        printed = "".join(s.stdout + s.stderr for s in self.steps)
        outputs = "".join(f"{k}={v}\n" for o in self.outputs.values() for k, v in o.items())
        return printed + outputs + self.summary + "".join(self.env_added.values())


class Runner:
    """Runs ``action``'s steps for a job; ``while_running(step, process)`` is called for a
    step's process right after it starts (to kill it midway, say)."""

    def __init__(self, action: dict[str, Any], temp: Path) -> None:
        self.action = action
        self.temp = temp

    def run(
        self,
        job: Job,
        while_running: Callable[[str, subprocess.Popen[str]], None] | None = None,
    ) -> dict[str, str]:
        """Run the steps in order; the action's outputs."""
        inputs = {
            name: job.inputs.get(name, str(spec.get("default", "")))
            for name, spec in self.action["inputs"].items()
        }
        unknown = set(job.inputs) - set(inputs)
        assert not unknown, f"the action has no inputs {unknown}"
        for index, step in enumerate(self.action["runs"]["steps"]):
            name = step.get("name") or step.get("uses", f"step {index}")
            if "uses" in step:
                continue
            condition = step.get("if")
            assert condition in (None, "always()"), f"unsupported if: {condition}"
            if condition is None and job.failed:
                job.steps.append(StepResult(name, ran=False))
                continue
            job.steps.append(self._step(job, index, step, name, inputs, while_running))
        return {
            name: self._expand(spec["value"], job, inputs)
            for name, spec in self.action.get("outputs", {}).items()
        }

    def _step(
        self,
        job: Job,
        index: int,
        step: dict[str, Any],
        name: str,
        inputs: Mapping[str, str],
        while_running: Callable[[str, subprocess.Popen[str]], None] | None,
    ) -> StepResult:
        assert step.get("shell") == "bash", f"{name}: only bash steps are run"
        files = {
            "GITHUB_OUTPUT": self.temp / f"output-{index}",
            "GITHUB_ENV": self.temp / f"env-{index}",
            "GITHUB_STEP_SUMMARY": self.temp / f"summary-{index}",
        }
        for path in files.values():
            path.write_text("")
        script = self.temp / f"step-{index}.sh"
        script.write_text(self._expand(step["run"], job, inputs))
        env = {
            **job.environ,
            **job.env_added,
            **{k: str(v) for k, v in files.items()},
            **{k: self._expand(str(v), job, inputs) for k, v in step.get("env", {}).items()},
        }
        process = subprocess.Popen(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=job.workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        if while_running is not None:
            while_running(name, process)
        try:
            stdout, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
        if "id" in step:
            job.outputs[step["id"]] = _read_pairs(files["GITHUB_OUTPUT"].read_text())
        job.env_added.update(_read_pairs(files["GITHUB_ENV"].read_text()))
        job.summary += files["GITHUB_STEP_SUMMARY"].read_text()
        return StepResult(name, True, process.returncode, stdout, stderr)

    def _expand(self, text: str, job: Job, inputs: Mapping[str, str]) -> str:
        def value(match: re.Match[str]) -> str:
            path = match.group(1).split(".")
            if path[0] == "inputs" and len(path) == 2:
                return inputs[path[1]]
            if path[0] == "steps" and len(path) == 4 and path[2] == "outputs":
                return job.outputs.get(path[1], {}).get(path[3], "")
            if path == ["runner", "temp"]:
                return str(self.temp)
            if path == ["github", "action_path"]:
                return str(ROOT)
            raise AssertionError(f"unsupported expression {match.group(0)}")

        return _EXPRESSION.sub(value, text)


def _read_pairs(text: str) -> dict[str, str]:
    """``name=value`` lines and ``name<<DELIMITER`` blocks, as the runner reads them."""
    pairs: dict[str, str] = {}
    lines = iter(text.splitlines())
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            block = []
            for inner in lines:
                if inner == delimiter:
                    break
                block.append(inner)
            pairs[name] = "\n".join(block)
        elif "=" in line:
            name, value = line.split("=", 1)
            pairs[name] = value
    return pairs
