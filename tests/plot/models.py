"""A tiny BERT-style encoder in plain PyTorch, with BERT's parameter names.

Many layers (embeddings, per-block query/key/value/output/intermediate, pooler,
classifier), per-token rows for the encoder's layers and one row per sequence for
the pooler and the classifier: the shape of store the report must stay readable on.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, SEQ, HIDDEN, INTERMEDIATE, HEADS, BLOCKS, CLASSES = 24, 6, 8, 16, 2, 2, 3


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        n, t, _ = x.shape

        def heads(z):
            return z.view(n, t, HEADS, HIDDEN // HEADS).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5, dim=-1)
        return (att @ v).transpose(1, 2).reshape(n, t, HIDDEN)


class _Dense(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self = _SelfAttention()
        self.output = _Dense(HIDDEN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, x):
        return self.norm(x + self.output.dense(self.self(x)))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = _Attention()
        self.intermediate = _Dense(HIDDEN, INTERMEDIATE)
        self.output = _Dense(INTERMEDIATE, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, x):
        x = self.attention(x)
        h = nn.functional.gelu(self.intermediate.dense(x))
        return self.norm(x + self.output.dense(h))


class _Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Embedding(SEQ, HIDDEN)
        self.token_type_embeddings = nn.Embedding(2, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None]
        return self.norm(x + self.token_type_embeddings(torch.zeros_like(ids)))


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList(_Block() for _ in range(BLOCKS))

    def forward(self, x):
        for block in self.layer:
            x = block(x)
        return x


class _Bert(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = _Embeddings()
        self.encoder = _Encoder()
        self.pooler = _Dense(HIDDEN, HIDDEN)


class TinyBertClassifier(nn.Module):
    """``bert.*`` + ``classifier``, as transformers' BertForSequenceClassification names them."""

    def __init__(self):
        super().__init__()
        self.bert = _Bert()
        self.classifier = nn.Linear(HIDDEN, CLASSES)

    def forward(self, ids):
        x = self.bert.encoder(self.bert.embeddings(ids))
        pooled = torch.tanh(self.bert.pooler.dense(x[:, 0]))
        return self.classifier(pooled)


def build_tiny_bert(config=None) -> nn.Module:
    torch.manual_seed(0)
    return TinyBertClassifier()
