"""Run under ``torchrun --nproc_per_node 2``: one DPO step on a toy set (each process takes half of
the batch), then each process writes its final weights to ``<out>/rank<k>.pt``."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.tiny_model import BootstrapConfig, build_model, build_tokenizer  # noqa: E402
from trainers import DPOConfig, train_dpo  # noqa: E402

RECORDS = [{"prompt": f"{a}+1\n", "prefix": "", "chosen": f"{a}+1={a + 1}\n", "rejected": f"{a}+1={a + 2}\n"}
           for a in range(10, 26)]


def build():
    tok = build_tokenizer()
    model = build_model(BootstrapConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                        len(tok), tok.pad_token_id, tok.eos_token_id)
    return model, tok


def main(out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    model, tok = build()
    summary = train_dpo(model, tok, RECORDS, DPOConfig(lr=1e-2, epochs=1, batch_size=16, warmup_steps=1))
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save({"state": model.state_dict(), "processes": summary["processes"], "steps": len(summary["steps"])},
               Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
