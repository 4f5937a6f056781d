"""The README is the user's manual: its first two commands and its layout table must stay true."""

import re
from pathlib import Path

from xoron_dist.parallel.layout import compatibility_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_compatibility_table_is_generated_from_the_validator():
    block = re.search(r"<!-- compatibility-table:start -->\n(.*?)<!-- compatibility-table:end -->", README, re.S)
    assert block, "README lost its compatibility-table markers"
    assert block.group(1) == compatibility_markdown(), (
        "README's layout table differs from xoron_dist.parallel.layout; regenerate it with\n"
        "python -c 'from xoron_dist.parallel.layout import compatibility_markdown as m; print(m())'"
    )


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    smoke, tests = first_block
    assert smoke.endswith("xoron train --config pipelines/smoke.yaml")
    assert tests.endswith("pytest -q")
    assert "torch==2.13.0" in smoke and "torch==2.13.0" in tests  # never a CUDA wheel on CPU machines
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_launch_scripts_named_in_the_readme_exist():
    for name in re.findall(r"launch_scripts/([\w.]+\.(?:sh|sbatch|example))", README):
        assert (ROOT / "launch_scripts" / name).is_file(), name
