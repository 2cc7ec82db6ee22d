"""Loading Hugging Face weights: declared ties, Conv1D orientation, prefixes, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

from gramlin_analyze.capture.hf_models import hf_factory  # noqa: E402
from gramlin_analyze.capture.outputs import model_outputs  # noqa: E402
from gramlin_analyze.capture.state_dict import load_state_dict_strict  # noqa: E402
from gramlin_analyze.cli import main  # noqa: E402
from gramlin_analyze.errors import ModelError  # noqa: E402
from gramlin_analyze.io.hf_conventions import conventions_for  # noqa: E402
from gramlin_analyze.io.registry import reader_for  # noqa: E402
from tests.hf import trainer_runs as runs  # noqa: E402


def test_strict_load_accepts_the_tie_save_pretrained_leaves_out(tmp_path):
    torch.manual_seed(8)
    trained = transformers.GPT2LMHeadModel(runs.gpt2_config())
    trained.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")  # a plain file: no reader conventions
    assert "lm_head.weight" not in tensors
    torch.manual_seed(9)
    fresh = transformers.GPT2LMHeadModel(runs.gpt2_config())
    assert not load_state_dict_strict(fresh, tensors)  # strict, and nothing tolerated
    wte = trained.transformer.wte.weight.detach().numpy()
    np.testing.assert_array_equal(fresh.lm_head.weight.detach().numpy(), wte)
    c_fc = trained.transformer.h[0].mlp.c_fc.weight.detach().numpy()
    np.testing.assert_array_equal(fresh.transformer.h[0].mlp.c_fc.weight.detach().numpy(), c_fc)


def test_hf_directory_lists_conv1d_out_in_and_the_tied_head(tmp_path):
    torch.manual_seed(10)
    model = transformers.GPT2LMHeadModel(runs.gpt2_config())
    model.save_pretrained(tmp_path)
    (tmp_path / "trainer_state.json").write_text('{"global_step": 7}')
    reader = reader_for("hf-trainer", {})
    with reader.open(tmp_path) as h:
        infos = h.list_tensors()
        proj = "transformer.h.1.attn.c_proj.weight"  # square: its shape says nothing
        assert infos[proj].source_layout == "in_out" and infos[proj].orientation == "config"
        w = model.transformer.h[1].attn.c_proj.weight.detach().numpy()
        np.testing.assert_array_equal(h.read_tensor(proj), w.T)
        assert infos["lm_head.weight"].tied_to == "transformer.wte.weight"
        np.testing.assert_array_equal(
            h.read_tensor("lm_head.weight"), model.transformer.wte.weight.detach().numpy()
        )
    assert conventions_for(None, infos).orientation == "default"
    untied = conventions_for({"model_type": "gpt2", "tie_word_embeddings": False}, infos)
    assert not untied.virtual and untied.orientation == "config"


def test_conv1d_weights_a_store_holds_as_listed_are_refused(tmp_path, capsys):
    """Weights-only ingest stores a bare ``torch.save`` of Conv1D weights as listed;
    capturing into that store would pair ``h`` with ``W`` transposed."""
    torch.manual_seed(11)
    model = runs.build_gpt2()
    run = tmp_path / "run"
    run.mkdir()
    torch.save(model.state_dict(), run / "step_1.pt")
    probe = runs.token_probe(tmp_path / "probe.npz", per_token=True, seed=12)
    store = str(tmp_path / "s.zarr")
    assert main(["ingest", str(run), "--store", store, "-q"]) == 0
    model_args = ["--probe", str(probe), "--model", "tests.hf.trainer_runs:build_gpt2"]
    code = main(["ingest", str(run), "--store", store, *model_args, "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "transformer.h.0.attn.c_attn" in err and "(in, out)" in err
    assert not (tmp_path / "s.zarr" / "probe").exists()  # refused before anything is stored


def test_key_mismatch_names_the_common_prefix():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    tensors = {f"net.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="checkpoint's keys start with `net.`"):
        load_state_dict_strict(model, tensors)


def test_outputs_of_hf_models():
    logits = torch.arange(6.0).reshape(2, 3)
    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=logits)
    assert model_outputs(out) is logits
    hidden = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=logits)
    with pytest.raises(ModelError, match="AutoModelFor"):
        model_outputs(hidden)


def test_model_hf_needs_a_config():
    with pytest.raises(ModelError, match="config.json"):
        hf_factory({})
    built = hf_factory({"model_type": "bert", "architectures": ["BertForMaskedLM"], **_tiny()})
    assert type(built).__name__ == "BertForMaskedLM"
    wide = hf_factory({"model_type": "bert", "dtype": "float64", **_tiny()})  # no architectures
    assert type(wide).__name__ == "BertModel"
    assert {p.dtype for p in wide.parameters()} == {torch.float64}


def _tiny() -> dict:
    return {"vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
