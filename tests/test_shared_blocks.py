"""The blocks that several scripts need are written once and kept byte-identical, so one file can be copied alone."""
import re
from collections import defaultdict

from conftest import ROOT

SCRIPTS = ["pretrain_offline.py", "make_dataset.py", "samg_sac.py", "samg_td3.py", "samg_awac.py", "samg_iql.py"]
BLOCK = re.compile(r"^# --- shared: (?P<name>.+?) ---\n(?P<body>.*?)^# --- end shared ---$", re.S | re.M)


def shared_blocks():
    blocks = defaultdict(dict)
    for script in SCRIPTS:
        path = ROOT / script
        if path.exists():
            for match in BLOCK.finditer(path.read_text()):
                assert match["name"] not in blocks or script not in blocks[match["name"]], f"{script} repeats a block"
                blocks[match["name"]][script] = match["body"]
    return blocks


def test_every_shared_block_is_byte_identical_in_every_script_that_has_it():
    blocks = shared_blocks()
    assert {"environment", "networks", "C-VAE and p(s,a)", "checkpoint I/O", "evaluation"} <= set(blocks)
    for name, bodies in blocks.items():
        reference_script, reference = next(iter(bodies.items()))
        for script, body in bodies.items():
            assert body == reference, f"shared block '{name}' differs between {reference_script} and {script}"


def test_online_scripts_carry_every_block_they_need():
    blocks = shared_blocks()
    for script in ["samg_sac.py", "samg_td3.py", "samg_awac.py", "samg_iql.py"]:
        if (ROOT / script).exists():
            for name in ["environment", "networks", "C-VAE and p(s,a)", "checkpoint I/O", "evaluation", "SAMG target"]:
                assert script in blocks[name], f"{script} lacks the shared block '{name}'"
    assert {"pretrain_offline.py", "samg_iql.py"} <= set(blocks["IQL value and losses"])
