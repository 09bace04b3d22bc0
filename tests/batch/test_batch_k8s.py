"""The Indexed Job manifest: valid for Kubernetes, and consistent with the runner's exit codes and CLI."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from batch import exit_codes
from batch.cli import add_run_parser
from batch.exit_codes import EXIT_INVALID_LINES, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "batch" / "k8s" / "indexed-job.yaml"
README = ROOT / "batch" / "README.md"


def test_manifest_passes_kubernetes_validate() -> None:
    tool = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    for version in ("1.31.0", "1.37.0"):  # podFailurePolicy and backoffLimitPerIndex are GA from 1.31 / 1.33
        result = subprocess.run([tool, "--strict", "-k", version, str(MANIFEST)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_manifest_matches_the_runner() -> None:
    job = yaml.safe_load(MANIFEST.read_text())
    spec = job["spec"]
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert spec["completionMode"] == "Indexed" and spec["backoffLimitPerIndex"] >= 1
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert spec["completions"] == spec["parallelism"] == int(env["NUM_SHARDS"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {mount["mountPath"] for mount in container["volumeMounts"]} >= {"/models", "/data"}
    assert env["MODEL_DIR"].startswith("/models/")

    rules = {rule["action"]: rule for rule in spec["podFailurePolicy"]["rules"]}
    assert rules["FailIndex"]["onExitCodes"]["values"] == [EXIT_INVALID_LINES]
    assert rules["FailJob"]["onExitCodes"]["values"] == [EXIT_USAGE]
    assert rules["FailIndex"]["onExitCodes"]["containerName"] == container["name"]
    assert rules["Ignore"]["onPodConditions"][0]["type"] == "DisruptionTarget"

    # The container's command line parses (with the shard count Kubernetes substitutes).
    argv = [arg.replace("$(NUM_SHARDS)", env["NUM_SHARDS"]) for arg in container["command"][3:] + container["args"]]
    assert argv[0] == "run" and "--num-shards" in argv
    parser = argparse.ArgumentParser()  # the runner's own parser, not a copy
    add_run_parser(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(argv)
    assert parsed.num_shards == int(env["NUM_SHARDS"]) and parsed.batch_size >= 1


def test_readme_exit_codes_match_the_runner_and_the_manifest() -> None:
    """The README's exit-code table lists every code the runner uses, with the manifest's action for each."""
    rows = {}
    for line in README.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            rows[int(cells[0])] = cells
    codes = {value for name, value in vars(exit_codes).items() if name.startswith("EXIT_")}
    assert set(rows) == codes
    job = yaml.safe_load(MANIFEST.read_text())
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        for code in rule.get("onExitCodes", {}).get("values", []):
            assert rule["action"] in rows[code][2], (code, rows[code])
    assert "read-only" in rows[EXIT_USAGE][1] and "--claim-ttl 0" in rows[EXIT_USAGE][1]
