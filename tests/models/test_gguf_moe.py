"""GGUF files of mixture-of-experts models, written as llama.cpp's converter writes them (the gguf package's
writer and tensor names, each projection of all experts stacked in one ``ffn_*_exps`` tensor, Mixtral as the
``llama`` architecture with its q/k rows permuted, Qwen3-MoE as ``qwen3moe``), read by sftjax: the model computes
the logits of the transformers model the file was made from; for Qwen3-MoE, transformers' own GGUF reader
agrees."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import require

torch = require("torch")
transformers = require("transformers")
gguf = require("gguf")

import sftjax  # noqa: E402
from sftjax.errors import CheckpointError  # noqa: E402
from sftjax.models import gguf_read  # noqa: E402
from tests.oracle import assert_close  # noqa: E402

EXPERTS, WIDTH = 4, 768  # transformers' GGUF reader takes Qwen3-MoE's expert width from its config default (768)
TOKENS = np.array([[1, 5, 9, 33, 7, 100, 3, 60, 2, 11], [4, 4, 8, 15, 16, 23, 42, 99, 120, 1]])


def _model(kind: str):
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)
    if kind == "qwen3moe":
        config = transformers.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=WIDTH,
                                             num_experts=EXPERTS, norm_topk_prob=True)
    else:
        config = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=EXPERTS)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.5 if name.endswith("mlp.gate.weight") else 0.1)
    return model


def _write(path, kind: str, model):
    """The GGUF llama.cpp's converter makes of ``model`` (float32)."""
    c = model.config
    arch = gguf.MODEL_ARCH.QWEN3MOE if kind == "qwen3moe" else gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(c.num_hidden_layers)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_vocab_size(c.vocab_size)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(c.num_experts_per_tok)
    if kind == "qwen3moe":
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    state = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()}

    def add(kind_, value, bid=None):
        writer.add_tensor(names[kind_].format(bid=bid) + ".weight", np.ascontiguousarray(value))

    def permute(rows, heads):  # llama.cpp's q/k permutation for the llama architecture (rotate-half -> pairs)
        return rows.reshape(heads, 2, rows.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(rows.shape)

    add(T.TOKEN_EMBD, state["model.embed_tokens.weight"])
    add(T.OUTPUT_NORM, state["model.norm.weight"])
    add(T.OUTPUT, state["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        if kind != "qwen3moe":
            q, k = permute(q, c.num_attention_heads), permute(k, c.num_key_value_heads)
        add(T.ATTN_Q, q, i)
        add(T.ATTN_K, k, i)
        add(T.ATTN_V, state[p + "self_attn.v_proj.weight"], i)
        add(T.ATTN_OUT, state[p + "self_attn.o_proj.weight"], i)
        if kind == "qwen3moe":
            add(T.ATTN_Q_NORM, state[p + "self_attn.q_norm.weight"], i)
            add(T.ATTN_K_NORM, state[p + "self_attn.k_norm.weight"], i)
        add(T.ATTN_NORM, state[p + "input_layernorm.weight"], i)
        add(T.FFN_NORM, state[p + "post_attention_layernorm.weight"], i)
        add(T.FFN_GATE_INP, state[p + "mlp.gate.weight"], i)
        gate_up, down = state[p + "mlp.experts.gate_up_proj"], state[p + "mlp.experts.down_proj"]  # [E, 2F, D]
        width = gate_up.shape[1] // 2
        add(T.FFN_GATE_EXP, gate_up[:, :width], i)  # [E, F, D]: numpy order, GGUF lists it reversed
        add(T.FFN_UP_EXP, gate_up[:, width:], i)
        add(T.FFN_DOWN_EXP, down, i)  # [E, D, F]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["qwen3moe", "mixtral"])
def test_moe_gguf_loads_with_the_logits_of_its_source_model(tmp_path, kind):
    model = _model(kind)
    path = _write(tmp_path / "m.gguf", kind, model)
    config, _ = gguf_read.read_gguf_checkpoint(path)
    assert config["model_type"] == ("qwen3_moe" if kind == "qwen3moe" else "mixtral")
    with torch.no_grad():
        want = model(torch.from_numpy(TOKENS), use_cache=False).logits.numpy()
    ours, ours_config = sftjax.load_model(path)
    assert ours_config.moe.num_experts == EXPERTS and ours_config.moe.num_experts_per_tok == 2
    assert_close(np.asarray(ours(TOKENS)), want, 1e-5, what=f"{kind} logits from the GGUF")
    if kind == "qwen3moe":  # transformers' own GGUF reader makes the same model of the file
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
        with torch.no_grad():
            theirs = reference(torch.from_numpy(TOKENS), use_cache=False).logits.numpy()
        assert_close(theirs, want, 1e-5, what="transformers' reading of the GGUF")


def test_moe_gguf_without_the_expert_width_is_a_one_line_error(tmp_path):
    model = _model("qwen3moe")
    path = _write(tmp_path / "m.gguf", "qwen3moe", model)
    reader_fields = gguf.GGUFReader(str(path)).fields
    assert "qwen3moe.expert_feed_forward_length" in reader_fields
    writer_path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(writer_path), "qwen3moe")
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((128, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="'qwen3moe.expert_feed_forward_length' is missing") as error:
        gguf_read.read_gguf_checkpoint(writer_path)
    assert str(writer_path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["qwen3moe", "mixtral"])
def test_moe_model_exports_to_the_gguf_llama_cpps_converter_writes(tmp_path, kind):
    """sftjax's ``write_gguf`` of a loaded MoE model stores every tensor as the converter-style file of ``_write``
    does (names, stacked experts, llama's q/k permutation) with llama.cpp's expert keys; transformers' GGUF
    reader (Qwen3-MoE) and sftjax's reader give the source model's logits."""
    from sftjax.models.gguf_write import write_gguf
    from sftjax.models.loading import load_model

    source = _model(kind)
    source.save_pretrained(tmp_path / "hf")
    reference = _write(tmp_path / "reference.gguf", kind, source)
    model, config = load_model(tmp_path / "hf")
    ours = write_gguf(model, config, None, tmp_path / "ours" / "m.gguf", dtype="f32")

    want = {t.name: gguf_read._dequantize(t, reference) for t in gguf.GGUFReader(str(reference)).tensors}
    got = {t.name: gguf_read._dequantize(t, ours) for t in gguf.GGUFReader(str(ours)).tensors}
    assert set(got) == set(want) and "blk.1.ffn_gate_exps.weight" in got
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    meta, ref_meta = gguf_read.read_gguf_metadata(ours), gguf_read.read_gguf_metadata(reference)
    arch = "qwen3moe" if kind == "qwen3moe" else "llama"
    assert meta["general.architecture"] == arch
    keys = [f"{arch}.{key}" for key in ("expert_count", "expert_used_count", "block_count", "feed_forward_length",
                                        "attention.head_count", "attention.head_count_kv")]
    if kind == "qwen3moe":
        keys += ["qwen3moe.expert_feed_forward_length", "qwen3moe.attention.key_length"]
    assert {k: meta[k] for k in keys} == {k: ref_meta[k] for k in keys}

    with torch.no_grad():
        expected = source(torch.from_numpy(TOKENS), use_cache=False).logits.numpy()
    back, back_config = sftjax.load_model(ours)
    assert back_config.moe.num_experts == EXPERTS
    assert_close(np.asarray(back(TOKENS)), expected, 1e-5, what=f"{kind} logits read back from our GGUF")
    if kind == "qwen3moe":
        theirs = transformers.AutoModelForCausalLM.from_pretrained(ours.parent, gguf_file=ours.name).eval()
        with torch.no_grad():
            logits = theirs(torch.from_numpy(TOKENS), use_cache=False).logits.numpy()
        assert_close(logits, expected, 1e-5, what="transformers' reading of our GGUF")


@pytest.mark.parametrize("kind, changes, message", [
    ("qwen3moe", dict(norm_topk_prob=False), "norm_topk_prob=false (llama.cpp's qwen3moe always renormalizes"),
    ("qwen3moe", dict(mlp_only_layers=[0]), "dense layers among the MoE layers"),
    ("mixtral", dict(sliding_window=4), "a sliding window (4)"),
])
def test_moe_configs_llama_cpp_cannot_run_are_refused_before_writing(tmp_path, kind, changes, message):
    from sftjax.models.gguf_write import check_exportable

    hf = _model(kind).config.to_dict()
    hf.update(changes)
    with pytest.raises(CheckpointError) as error:
        check_exportable(hf, where=str(tmp_path / "m.gguf"))
    assert message in str(error.value) and "\n" not in str(error.value)
