"""The blocks that several scripts need are written once and kept byte-identical, so one file can be copied alone.
Each script's blocks are listed here exactly, in file order: a block renamed, dropped, added or edited in one script
fails, and so does a banner that the block pattern cannot read."""
import re

from conftest import ROOT

BLOCK = re.compile(r"^# --- shared: (?P<name>.+?) ---\n(?P<body>.*?)^# --- end shared ---$", re.S | re.M)
ONLINE = ["online arguments", "environment", "networks", "{actor}", "C-VAE and p(s,a)", "SAMG target", "replay",
          "online run", "evaluation"]
BLOCKS = {
    "pretrain_offline.py": ["environment", "networks", "tanh-Gaussian actor", "deterministic actor", "Gaussian actor",
                            "IQL value and losses", "C-VAE and p(s,a)", "checks, logs and progress", "dataset names",
                            "evaluation"],
    "make_dataset.py": ["environment", "networks", "tanh-Gaussian actor", "checks, logs and progress", "dataset names",
                        "evaluation"],
    "samg_sac.py": [name.format(actor="tanh-Gaussian actor") for name in ONLINE],
    "samg_td3.py": [name.format(actor="deterministic actor") for name in ONLINE],
    "samg_awac.py": [name.format(actor="Gaussian actor") for name in ONLINE],
    "samg_iql.py": [name.format(actor="Gaussian actor") for name in ONLINE[:6]] + ["IQL value and losses"]
                   + ONLINE[6:],
}


def blocks_of(script: str) -> list:
    text = (ROOT / script).read_text()
    found = [(match["name"], match["body"]) for match in BLOCK.finditer(text)]
    # every banner belongs to a block the pattern reads: none misspelt, unclosed or nested
    assert text.count("# --- shared:") == len(found) == text.count("# --- end shared ---"), script
    return found


def test_each_script_has_exactly_its_list_of_shared_blocks_in_order():
    for script, names in BLOCKS.items():
        assert [name for name, _ in blocks_of(script)] == names, script


def test_every_shared_block_is_byte_identical_in_every_script_that_has_it():
    bodies = {}
    for script in BLOCKS:
        for name, body in blocks_of(script):
            reference_script, reference = bodies.setdefault(name, (script, body))
            assert body == reference, f"shared block '{name}' differs between {reference_script} and {script}"
    assert all(sum(name in names for names in BLOCKS.values()) >= 2 for name in bodies)  # each is shared


def test_each_script_reads_the_algorithm_before_one_plumbing_banner_and_ends_with_main():
    for script in BLOCKS:
        text = (ROOT / script).read_text()
        assert text.count("\n# ====") == 2, script  # the banner's two rules, once
        banner = text.index("\n# ====")
        assert text.index("\ndef main(args: Args):") < banner, script
        assert text.rstrip().endswith(("main(tyro.cli(Args))", "run_main(main, Args)")), script
        for name in ("checks, logs and progress", "online run", "dataset names"):
            if f"# --- shared: {name} ---" in text:
                assert text.index(f"# --- shared: {name} ---") > banner, (script, name)
