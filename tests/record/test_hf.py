"""A real Hugging Face Trainer on a config-built GPT-2 (Conv1D layers) with the callback."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.torch import load_file  # noqa: E402

from gramlin_analyze.record import RECORD_NAME, GramlinHFCallback, read_record  # noqa: E402
from tests.record.helpers import rel  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int):
        gen = torch.Generator().manual_seed(40)
        self.ids = torch.randint(vocab, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_trainer_callback_records_into_checkpoint_dirs(tmp_path):
    torch.manual_seed(41)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config).double()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        dataloader_num_workers=0,
        save_only_model=True,
    )
    callback = GramlinHFCallback(layers=["transformer.h.*"], mode="full", sgd_terms=True)
    transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(16, 8, 32), callbacks=[callback]
    ).train()
    rec_a, _ = read_record(tmp_path / "checkpoint-2" / RECORD_NAME)
    rec_b, meta = read_record(tmp_path / "checkpoint-4" / RECORD_NAME)
    assert (
        meta["step"] == "4" and meta["framework"] == "transformers" and meta["plain_sgd"] == "true"
    )
    w_a = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    w_b = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    names = callback.recorder.layers
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.0.mlp.c_fc" in names
    for name in names:
        Wa, Wb = w_a[f"{name}.weight"].t(), w_b[f"{name}.weight"].t()  # Conv1D: W = weight.T
        actual = Wb.t() @ Wb - Wa.t() @ Wa
        d = {
            q: rec_b[f"{name}.{q}"] - rec_a[f"{name}.{q}"]
            for q in ("vcs_first", "sgd_second", "dgram")
        }
        assert rel(d["vcs_first"] + d["sgd_second"], actual) < 1e-8, name
        assert rel(d["dgram"], actual) < 1e-10, name
        assert int(rec_b[f"{name}.samples"]) == 4 * 4 * 8
