"""Deployment files parse and reference things that exist (no Docker engine runs here)."""
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_has_the_services_and_keeps_secrets_out():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"postgres", "ray-head", "ray-worker", "dashboard"} <= set(compose["services"])
    for name in ("ray-head", "ray-worker", "dashboard"):
        build = compose["services"][name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD: ${GSMSEARCH_DB_PASSWORD" in text  # from the environment only
    # the dashboard is published on the host's loopback only
    assert compose["services"]["dashboard"]["ports"] == ["127.0.0.1:8050:8050"]
    assert "studies/quickstart_postgres.yaml" in text and (ROOT / "studies/quickstart_postgres.yaml").is_file()


def test_slurm_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(ROOT / "deploy" / "slurm.sbatch")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make quickstart" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_compose_study_keeps_its_workdir_on_the_volume_every_ray_node_mounts():
    """A retried trial resumes from its checkpoint on whichever worker it lands: the compose
    study's workdir must be on a volume that the head and every worker mount."""
    from gsmsearch.search import load_spec

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    workdir = load_spec(ROOT / "studies/quickstart_postgres.yaml").workdir
    assert workdir and Path(workdir).is_absolute()
    for name in ("ray-head", "ray-worker"):
        mounts = [v.split(":")[1] for v in compose["services"][name]["volumes"]
                  if not v.split(":")[0].startswith((".", "/"))]  # named volumes: shared
        assert any(Path(workdir).is_relative_to(m) for m in mounts), (name, mounts, workdir)
    # the dashboard comes back if it starts before the database answers
    assert compose["services"]["dashboard"]["restart"] in ("unless-stopped", "always", "on-failure")
