"""Makes one offline dataset ready for pretrain_offline.py, without training anything.

    python benchmark/prepare_dataset.py --env-id hopper-medium-expert-v2

It runs pretrain_offline.py's own code, imported from the repository root, for one --env-id: the id resolves exactly
as a pretraining run resolves it when it starts (an imported D4RL file, a downloaded hosted port, a dataset made by
make_dataset.py, else a download of the hosted port; medium-expert is combined from medium + expert), then the whole
dataset is read and its environment made once, as pretraining does. A dataset that cannot be had or used stops here
with pretrain_offline.py's one-sentence errors. Nothing is written but the dataset itself, in the Minari store.

The benchmark's dataset stage (benchmark/run_suite.py) runs this once for each dataset given by a D4RL-style name or
a Minari id, so that the pretraining runs that need it, started together on a cluster, find it in the store and
never download or combine at the same time.
"""
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]


def load_pretrain_offline():
    """pretrain_offline.py as a module (its module-level code only defines; the training sits under __main__)."""
    spec = importlib.util.spec_from_file_location("pretrain_offline", ROOT / "pretrain_offline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


po = load_pretrain_offline()


@dataclass
class Args:
    env_id: str = "hopper-medium-v2"
    """Minari dataset id (`mujoco/hopper/medium-v0`) or D4RL-style name (`hopper-medium-v2`), as pretrain_offline.py
    takes it"""


def prepare(env_id: str) -> dict:
    """Resolves `env_id` (downloading and combining where needed), reads the dataset and makes its environment, with
    the calls pretrain_offline.py makes before it trains; returns the loaded dataset."""
    dataset_id = po.resolve_dataset(env_id, download=True)
    print(f"dataset: {env_id} -> {dataset_id}")
    if po.comparability_warning(env_id, dataset_id):
        print(po.comparability_warning(env_id, dataset_id))
    data = po.load_dataset(dataset_id)
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    env = po.make_env(data["gym_id"], data["gym_kwargs"], seed=1)
    env_obs_dim = po.flatten_obs(env.reset(seed=1)[0]).shape[-1]
    if env_obs_dim != obs_dim or env.action_space.shape != (act_dim,):
        po.fail(f"dataset {dataset_id} has {obs_dim}-dim states and {act_dim}-dim actions but {data['gym_id']} has "
                f"{env_obs_dim} and {env.action_space.shape}; the dataset records the wrong environment")
    env.close()
    print(f"{len(data['rewards'])} transitions, obs dim {obs_dim}, action dim {act_dim}, env {data['gym_id']}: "
          "ready for pretrain_offline.py")
    return data


if __name__ == "__main__":
    sys.excepthook = po.exit_quietly_on_interrupt
    args = tyro.cli(Args)
    prepare(args.env_id)
