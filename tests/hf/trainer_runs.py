"""Tiny transformers models built from configs (nothing downloaded), trained a few steps
with the Hugging Face ``Trainer`` into ``checkpoint-N/`` directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

VOCAB, SEQ, EMBD, LAYERS, HEADS, CLASSES = 64, 16, 32, 2, 2, 3


class Examples(torch.utils.data.Dataset):
    """Seeded random token sequences; ``labels`` per token (LM) or per sequence (classes)."""

    def __init__(self, n: int, *, per_token: bool, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(VOCAB, (n, SEQ), generator=gen)
        self.classes = torch.randint(CLASSES, (n,), generator=gen)
        self.per_token = per_token

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        labels = self.ids[i] if self.per_token else self.classes[i]
        return {"input_ids": self.ids[i], "labels": labels}


def gpt2_config() -> transformers.GPT2Config:
    """A GPT-2 decoder with tied input/output embeddings (GPT-2's default)."""
    return transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=EMBD,
        n_layer=LAYERS,
        n_head=HEADS,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=True,
    )


def bert_config() -> transformers.BertConfig:
    """A BERT encoder with a sequence-classification head."""
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=EMBD,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * EMBD,
        max_position_embeddings=SEQ,
        num_labels=CLASSES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def train(model: torch.nn.Module, out: Path, data: Examples, *, steps: int, every: int) -> Path:
    """SGD with the Trainer, a ``checkpoint-N/`` directory every ``every`` steps."""
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_steps=every,
        per_device_train_batch_size=4,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        dataloader_num_workers=0,
        save_only_model=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    return out


def token_probe(path: Path, *, per_token: bool, seed: int) -> Path:
    """A probe file of token ids with next-token labels (LM) or class labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (6, SEQ))
    labels = np.roll(ids, -1, axis=1) if per_token else rng.integers(0, CLASSES, 6)
    np.savez(path, inputs=ids, labels=labels)
    return path


def build_bert(config: dict) -> torch.nn.Module:
    """A factory returning the transformers model as it is (its forward returns a ModelOutput)."""
    return transformers.BertForSequenceClassification(transformers.BertConfig(**config))


def build_gpt2() -> torch.nn.Module:
    """A factory for checkpoints without a config.json: the GPT-2 of :func:`gpt2_config`."""
    return transformers.GPT2LMHeadModel(gpt2_config())
