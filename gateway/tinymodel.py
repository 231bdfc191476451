"""Generate the tiny deterministic GGUF chat model the demo and tests serve (DESIGN §5).

A 2-layer llama with random weights and a byte-level BPE vocabulary: real llama.cpp loads,
tokenizes, templates and generates with it, and nothing is downloaded. Facts it relies on are in
shared/notes/local-inference.md.

Random weights emit control bytes and lone UTF-8 lead bytes, and llama-cpp-python 0.3.36 then
overruns `max_tokens`; a "bias channel" fixes that: residual dimension 0 is held constant
(its embedding is 1, attention and FFN never write to it) and the output head gives every
token that is not printable ASCII a -50 weight on it, so only printable text is ever sampled
and EOS never is (completion_tokens == max_tokens, finish_reason "length").
"""

from __future__ import annotations

from pathlib import Path

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX = 512
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BIGRAMS = (
    "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng se "
    "ha as ou io le ve co me de hi ri ro ic ne ea ra ce li ch ll be ma si om ur"
).split()
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def vocabulary() -> tuple[list[str], list[int], list[str], set[int]]:
    """Tokens, token types, merges, and the ids of printable-ASCII tokens."""
    from gguf import TokenType

    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    types = [int(TokenType.NORMAL)] * 256
    printable = {b for b in range(0x20, 0x7F)}
    merges = []
    for pair in BIGRAMS:
        merges.append(f"{pair[0]} {pair[1]}")
        printable.add(len(tokens))
        tokens.append(pair)
        types.append(int(TokenType.NORMAL))
    for special in SPECIALS:
        tokens.append(special)
        types.append(int(TokenType.CONTROL))
    return tokens, types, merges, printable


def generate(path: Path, seed: int = 7) -> Path:
    """Write the model to `path` (byte-identical for the same seed) and return it."""
    import numpy as np
    from gguf import GGUFWriter

    tokens, types, merges, printable = vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float = 0.08) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = GGUFWriter(str(path), "llama")
    w.add_name("enclave-tiny")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eot, im_start, im_end = (tokens.index(s) for s in SPECIALS)
    w.add_bos_token_id(im_start)
    w.add_eos_token_id(im_end)
    w.add_eot_token_id(im_end)
    w.add_pad_token_id(eot)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML)

    embd = rand(n_vocab, N_EMBD, scale=0.05)
    embd[:, 0] = 1.0  # the bias channel
    w.add_tensor("token_embd.weight", embd)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v"):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(N_EMBD, N_EMBD))
        attn_out = rand(N_EMBD, N_EMBD)
        attn_out[0, :] = 0.0
        w.add_tensor(f"blk.{i}.attn_output.weight", attn_out)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(N_FF, N_EMBD))
        down = rand(N_EMBD, N_FF)
        down[0, :] = 0.0
        w.add_tensor(f"blk.{i}.ffn_down.weight", down)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    head = rand(n_vocab, N_EMBD, scale=0.5)
    head[:, 0] = 0.0
    for tok in range(n_vocab):
        if tok not in printable:
            head[tok, 0] = -50.0
    w.add_tensor("output.weight", head)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
