"""FSDP2 for pretraining on CPU: the accelerate yamls' wrap plan, torchrun + gloo sharding vs one process, the
Slurm launcher's arguments.

Accelerate cannot run FSDP on CPU, so sharded training runs the recipe under ``torchrun --nproc_per_node 2`` with
``--cpu_fsdp true`` (torch ``fully_shard`` with the same wrap classes as the yamls).
"""

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from modeling_open_qwen2vl import OpenQwen2VLConfig, OpenQwen2VLForConditionalGeneration
from recipes.training.fsdp import WRAP_CLASS_NAMES
from recipes.training.run_logs import read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.pretrain_runs import ROOT, pretrain_argv, toy_corpus  # noqa: E402

YAMLS = sorted((ROOT / "recipes" / "accelerate").glob("fsdp2_*.yaml"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("yaml_path", YAMLS, ids=[p.stem for p in YAMLS])
def test_accelerate_yaml_wraps_each_encoder_and_decoder_layer(yaml_path):
    """The yaml goes through accelerate's own launch validation and environment, as `accelerate launch` does."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(yaml_path), "recipes/pretrain.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.activation_checkpointing
    config = OpenQwen2VLConfig.tiny()
    model = OpenQwen2VLForConditionalGeneration(config)
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [m for m in model.modules() if policy(m)]
    assert {type(m).__name__ for m in wrapped} == set(WRAP_CLASS_NAMES)
    assert len(wrapped) == config.vision_config.num_hidden_layers + config.text_config.num_hidden_layers
    expected = {"fsdp2_1gpu": (1, 1), "fsdp2_8gpu": (8, 1), "fsdp2_multinode": (16, 2)}[yaml_path.stem]
    assert (args.num_processes, args.num_machines) == expected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, processor):
    return toy_corpus(tmp_path_factory, processor, "fsdp_corpus", num_documents=96)


def _args(corpus, output_dir, *extra):
    return pretrain_argv(corpus, output_dir, "--report_to", "none", "--max_steps", "3", "--save_steps", "2", *extra)


def _run(command, env=None, **kwargs):
    result = subprocess.run(command, env=env or ENV, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_fsdp_sharded_training_matches_one_process(corpus, tmp_path):
    """2 processes x 1 pack (FSDP2, gloo) == 1 process x 2 packs: same global batch, same losses and weights;
    the sharded checkpoint written by 2 processes resumes in 1 process."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    sharded, single, resumed = tmp_path / "sharded", tmp_path / "single", tmp_path / "resumed"
    _run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", str(ROOT / "recipes" / "pretrain.py"),
          *_args(corpus, sharded, "--cpu_fsdp", "true", "--per_device_train_batch_size", 1)])
    _run([sys.executable, str(ROOT / "recipes" / "pretrain.py"),
          *_args(corpus, single, "--per_device_train_batch_size", 2)])

    expected, got = read_jsonl(single / "metrics.jsonl"), read_jsonl(sharded / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"] and b["supervised_tokens"] == a["supervised_tokens"]
    assert expected[-1]["loss"] < expected[0]["loss"]

    # The checkpoint really is sharded: every decoder weight is stored as two row blocks, one per process.
    import torch.distributed.checkpoint as dcp

    step_2 = sharded / "checkpoints" / "step-00000002"
    metadata = dcp.FileSystemReader(str(step_2 / "model_optimizer")).read_metadata().state_dict_metadata
    chunks = metadata["model.model.language_model.layers.0.mlp.up_proj.weight"].chunks
    assert sorted(tuple(c.offsets) for c in chunks) == [(0, 0), (64, 0)]
    assert len(list((step_2 / "model_optimizer").glob("*.distcp"))) == 2

    from safetensors.torch import load_file

    a = load_file(str(single / "final_model" / "model.safetensors"))
    b = load_file(str(sharded / "final_model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)

    # Resume the 2-process checkpoint of step 2 in one process (same global micro-batch: 1 x 2 packs).
    _run([sys.executable, str(ROOT / "recipes" / "pretrain.py"),
          *_args(corpus, resumed, "--per_device_train_batch_size", 2, "--resume_from_checkpoint", step_2)])
    after = read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in after] == [3]
    assert after[0]["loss"] == pytest.approx(expected[2]["loss"], rel=1e-5)

    # And the other way: the 1-process checkpoint scales out to 2 FSDP processes (the new process starts from the
    # global data position of process 0, the only one the checkpoint holds).
    single_2, scaled = single / "checkpoints" / "step-00000002", tmp_path / "scaled"
    assert not (single_2 / "data_rank1.json").exists()
    _run([torchrun, "--nproc_per_node", "2", "--master_port", "29535", str(ROOT / "recipes" / "pretrain.py"),
          *_args(corpus, scaled, "--cpu_fsdp", "true", "--per_device_train_batch_size", 1,
                 "--resume_from_checkpoint", single_2)])
    after = read_jsonl(scaled / "metrics.jsonl")
    assert [r["step"] for r in after] == [3]
    assert after[0]["loss"] == pytest.approx(expected[2]["loss"], rel=1e-5)
    assert after[0]["tokens"] == expected[2]["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "full"])
def test_plain_data_parallel_under_torchrun_matches_one_process(corpus, tmp_path, stage):
    """2 processes without --cpu_fsdp: accelerate wraps the model in DistributedDataParallel (gloo on CPU, set up by
    the recipe itself); same global batch as 1 process x 2 packs, same losses, one metrics file, the same final
    model. Stage ``full`` trains the vision tower, whose layers past the feature layer never run: DDP would stop at
    the second step waiting for their gradients if they were left trainable."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    common = ("--max_steps", 2, "--save_steps", 0, "--save_final_checkpoint", "false", "--stage", stage)
    _run([torchrun, "--nproc_per_node", "2", "--master_port", "29537", str(ROOT / "recipes" / "pretrain.py"),
          *_args(corpus, ddp, "--per_device_train_batch_size", 1, *common)], env=env)
    _run([sys.executable, str(ROOT / "recipes" / "pretrain.py"),
          *_args(corpus, single, "--per_device_train_batch_size", 2, *common)])
    expected, got = read_jsonl(single / "metrics.jsonl"), read_jsonl(ddp / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2]  # written once, by the main process
    for a, b in zip(expected, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)

    from safetensors.torch import load_file

    a = load_file(str(single / "final_model" / "model.safetensors"))
    b = load_file(str(ddp / "final_model" / "model.safetensors"))  # written from the DDP-wrapped model
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_slurm_script_launches_one_accelerate_per_node(tmp_path):
    """Run the sbatch script with stand-ins for scontrol, srun (2 nodes) and accelerate that record arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.txt"
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        "while [[ $1 == --* ]]; do shift; done\n"  # drop srun's own options
        "for node in 0 1; do SLURM_NODEID=$node \"$@\" || exit 1; done\n"
    )
    (bin_dir / "accelerate").write_text(f"#!/bin/bash\necho \"$*\" >> {record}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_NNODES": "2", "DATA": "/shared/packed", "OUTPUT_DIR": "/shared/run"}
    subprocess.run(["bash", str(ROOT / "recipes" / "slurm" / "pretrain_multinode.sh"), "--learning_rate", "1e-4"],
                   env=env, cwd=ROOT, check=True, capture_output=True, text=True, timeout=60)
    calls = record.read_text().splitlines()
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        assert call.startswith("launch --config_file recipes/accelerate/fsdp2_multinode.yaml --num_machines 2 "
                               f"--num_processes 16 --machine_rank {rank} --main_process_ip node-a "
                               "--main_process_port 29500 recipes/pretrain.py")
        assert "--config recipes/configs/pretrain_open_qwen2vl_2b.yaml" in call
        assert "--dataset_name_or_path /shared/packed --output_dir /shared/run --resume true" in call
        assert call.endswith("--learning_rate 1e-4")
