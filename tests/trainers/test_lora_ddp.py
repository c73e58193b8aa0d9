import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers import DPOConfig, read_step_dpo, to_trl, train_dpo, write_trl_jsonl

RECS = [{"prompt": f"{a}+1\n", "prefix": "", "chosen": f"{a}+1={a + 1}\n", "rejected": f"{a}+1={a + 2}\n"}
        for a in range(10, 26)]


def test_lora_lowers_loss_and_merges_back(tiny_random):
    model, tok = tiny_random
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = train_dpo(model, tok, RECS, DPOConfig(lr=5e-2, epochs=6, batch_size=8, beta=1.0, lora=True,
                                                    warmup_steps=1, lora_targets=("q_proj", "v_proj", "up_proj")))
    assert summary["steps"][-1]["loss"] < summary["steps"][0]["loss"] - 0.05
    n_all = sum(p.numel() for p in model.parameters())
    assert 0 < summary["trainable_parameters"] < n_all / 4  # adapters only
    assert set(model.state_dict()) == set(before)  # merged: plain modules again
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert changed and all(any(t in k for t in ("q_proj", "v_proj", "up_proj")) for k in changed)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="not in the model"):
        train_dpo(model, tok, RECS, DPOConfig(lora=True, lora_targets=("c_attn",)))


def test_bf16_autocast_lowers_loss_and_stays_close_to_float32(tiny_random):
    model, tok = tiny_random
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dict(lr=3e-3, epochs=4, batch_size=8, beta=1.0, warmup_steps=1)
    fp32 = train_dpo(model, tok, RECS, DPOConfig(**cfg))
    model.load_state_dict(state)
    bf16 = train_dpo(model, tok, RECS, DPOConfig(**cfg, bf16=True))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast only: weights stay float32
    assert bf16["steps"][-1]["loss"] < bf16["steps"][0]["loss"] - 0.05
    first32, first16 = fp32["steps"][0], bf16["steps"][0]
    assert abs(first16["logps/chosen"] - first32["logps/chosen"]) < 0.05 * abs(first32["logps/chosen"])
    assert first16["logps/chosen"] != first32["logps/chosen"]  # it really ran in bfloat16


def test_full_finetuning_with_accumulation_and_checkpointing_lowers_loss(tiny_random):
    model, tok = tiny_random
    summary = train_dpo(model, tok, RECS, DPOConfig(lr=3e-3, epochs=4, batch_size=8, beta=1.0, grad_accum_steps=2,
                                                    gradient_checkpointing=True))
    assert summary["steps"][-1]["loss"] < summary["steps"][0]["loss"] - 0.05
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.parameters())


def test_accumulation_equals_one_big_batch_and_unshared_equals_shared(tiny_random):
    model, tok = tiny_random
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for kw in (dict(), dict(grad_accum_steps=4), dict(prefix_sharing="off")):
        model.load_state_dict(state)
        train_dpo(model, tok, RECS, DPOConfig(lr=1e-3, epochs=1, batch_size=16, warmup_steps=1, sft_weight=1.0, **kw))
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[2], results[0], atol=1e-5, rtol=0)


def test_two_processes_ddp_gloo_end_with_identical_weights(tmp_path, tiny_random):
    """Two CPU processes (torchrun, gloo) take one DPO step on halves of a batch; both end with the
    same weights, equal to one process taking the step on the whole batch."""
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path)]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=240)
    finally:  # never leave workers behind, even when the launcher hangs or the test fails
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert launcher.returncode == 0, stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a["processes"] == 2 and a["steps"] == 1
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    model, tok = tiny_random  # the worker's model and data, in one process
    sys.path.insert(0, str(worker.parent))
    from ddp_worker import RECORDS, build

    model, tok = build()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    train_dpo(model, tok, RECORDS, DPOConfig(lr=1e-2, epochs=1, batch_size=16, warmup_steps=1))
    # Adam's first step moves each weight by about lr (1e-2) times the sign of its gradient, so a
    # rank that missed the all-reduce would be off by ~1e-2 on many weights. Only weights whose
    # gradient is near Adam's eps feel the other summation order of two processes (1.1e-5 on one
    # CPU): hence 1% of lr.
    for k, v in model.state_dict().items():
        torch.testing.assert_close(a["state"][k], v, atol=1e-4, rtol=0)
    assert any(not torch.equal(init[k], a["state"][k]) for k in init)


def test_trl_export_and_step_dpo_import(tmp_path):
    from datasets import load_dataset

    pairs = [{"prompt": "1+2\n", "prefix": "1+2=3\n", "chosen": "3*2=6\n", "rejected": "3*2=5\n"}]
    assert to_trl(pairs) == [{"prompt": "1+2\n1+2=3\n", "chosen": "3*2=6\n", "rejected": "3*2=5\n"}]
    path = tmp_path / "trl.jsonl"
    assert write_trl_jsonl(pairs, path) == 1
    ds = load_dataset("json", data_files=str(path), split="train")
    assert ds[0] == to_trl(pairs)[0]
    step = tmp_path / "step.json"
    step.write_text('[{"dataset": "gsm8k", "prompt": "Q?\\n", "initial_reason_steps": "Step 1: a\\n", '
                    '"chosen": "Step 2: b\\n", "rejected": "Step 2: c\\n", "answer": "1"}]')
    (rec,) = read_step_dpo(step)
    assert (rec["prompt"], rec["prefix"], rec["chosen"], rec["rejected"]) == ("Q?\n", "Step 1: a\n", "Step 2: b\n",
                                                                                "Step 2: c\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ValueError, match="row 0 lacks text field.*initial_reason_steps"):
        read_step_dpo(bad)
