"""`nextgpt train` on every shipped YAML: the tiny stages chained end to end (each stage's loss
falls, the result generates), the nextgpt-7b stages on tiny stand-ins, and one-line usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nextgpt.cli import main
from nextgpt.model import NextGPT

CONFIGS = Path(__file__).parents[1] / "nextgpt" / "configs"
TRAIN = CONFIGS / "train"
QUIET = ["--progress", "false", "--tensorboard", "false"]
FEWER_EVALS = ["--eval_every", "0", "--save_every", "0"]  # evaluate at the start and the end

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def evals(run: Path) -> list[dict]:
    latest = run / (run / "latest").read_text().strip()
    return json.loads((latest / "trainer_state.json").read_text())["evals"]


@pytest.mark.slow
def test_tiny_stages_chain_and_each_loss_falls(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["toy-data", "data/toy"]) == 0
    assert main(["train", str(TRAIN / "tiny-stage1.yaml"), *QUIET, *FEWER_EVALS]) == 0
    # stage 2 reads caption embeddings precomputed once
    assert main(["embed-captions", str(TRAIN / "tiny-stage2.yaml")]) == 0
    assert "image: 3 new" in capsys.readouterr().out
    assert list(Path("runs/tiny-caption-embeddings").glob("image-*.safetensors"))
    assert (
        main(["train", str(TRAIN / "tiny-stage2.yaml"), *FEWER_EVALS, "--progress", "false"]) == 0
    )
    assert list(Path("runs/tiny-stage2/logs").rglob("events.out.tfevents.*"))
    assert main(["train", str(TRAIN / "tiny-stage3.yaml"), *QUIET, *FEWER_EVALS]) == 0
    out = capsys.readouterr().out
    assert "runs/tiny-stage3/checkpoint-00000030" in out

    drops = {}
    for stage, margin in ((1, 0.03), (2, 2.0), (3, 0.5)):
        history = evals(Path(f"runs/tiny-stage{stage}"))
        assert history[0]["step"] == 0 and history[-1]["step"] == 30
        drops[stage] = history[0]["eval_loss"] - history[-1]["eval_loss"]
        assert drops[stage] > margin, f"stage {stage}: eval loss fell only {drops[stage]:.3f}"
    print("eval-loss drops per stage:", drops)

    model = NextGPT.from_pretrained("runs/tiny-stage3")
    reply = model.generate("Draw a red square.", modalities=["image"], max_new_tokens=8)
    assert reply.images and reply.images[0].size[0] > 0
    # the stage-3 model carries stage 2's output projectors forward, trained further
    assert model.llm.has_lora


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_nextgpt_7b_configs_run_on_tiny_stand_ins(tmp_path, monkeypatch, stage):
    """Everything in the 7b YAML but the model and the data is exercised for two steps."""
    from nextgpt.data.toy import write_toy_dataset

    monkeypatch.chdir(tmp_path)
    toy = write_toy_dataset("toy", copies=1)
    config = yaml.safe_load((TRAIN / f"nextgpt-7b-stage{stage}.yaml").read_text())
    assert config["stage"] == stage and config["precision"] == "bf16"
    overrides = [
        "--model",
        "tiny",
        "--data.train",
        json.dumps([{"path": str(toy[f"stage{stage}"])}]),
        "--data.num_workers",
        "0",
        "--data.caption_embeddings",
        "null",
        "--data.eval_fraction",
        "0.2",
        "--batch_size",
        "2",
        "--max_steps",
        "2",
        "--lora.r",
        "4",
        *QUIET,
    ]
    assert main(["train", str(TRAIN / f"nextgpt-7b-stage{stage}.yaml"), *overrides]) == 0
    run = Path(config["out_dir"])
    state = json.loads((run / "checkpoint-00000002" / "trainer_state.json").read_text())
    assert state["stage"] == stage and len(state["evals"]) == 2


def test_every_accelerate_config_parses():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted((CONFIGS / "accelerate").glob("*.yaml")):
        kinds[path.stem] = str(load_config_from_file(str(path)).distributed_type).split(".")[-1]
    assert kinds == {
        "ddp": "MULTI_GPU",
        "deepspeed-zero2": "DEEPSPEED",
        "deepspeed-zero3": "DEEPSPEED",
        "fsdp": "FSDP",
    }


def test_bad_configs_and_data_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = TRAIN / "tiny-stage1.yaml"
    assert main(["train", str(config), "--learning_rate", "1"]) == 2
    assert "unknown field(s) ['learning_rate'] for TrainConfig" in capsys.readouterr().err
    assert main(["train", str(config), "--stage", "4"]) == 2
    assert "stage: 4 is not one of [1, 2, 3]" in capsys.readouterr().err
    assert main(["train", str(config)]) == 2  # no toy data written here
    assert "data/toy/stage1.json: data file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}]))
    assert main(["train", str(config), "--data.train.0.path", str(bad), *QUIET]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nextgpt: error: {bad}: record 0: no gpt turn: nothing to learn from"]
