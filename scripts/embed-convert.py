#!/usr/bin/env python3
"""embed-convert.py MODEL_DIR OUT.gguf [f16|f32] — turn a sentence-transformers BERT model
(config.json, tokenizer.json, model.safetensors, modules.json) into a GGUF file that llama.cpp
serves in embedding mode, without torch: the same header, vocabulary and tensor names as
llama.cpp's own convert_hf_to_gguf.py writes for BertModel (2-D weights at f16; norms, biases
and the position / token-type tables stay f32, which llama.cpp adds to f32 activations).
Used by scripts/embed-install; needs gguf, safetensors and numpy on PYTHONPATH."""
import json, sys
from pathlib import Path
import numpy as np
import gguf
from safetensors.numpy import load_file

src, out = Path(sys.argv[1]), sys.argv[2]
ftype = sys.argv[3] if len(sys.argv) > 3 else "f16"
hp = json.loads((src / "config.json").read_text())
assert hp["model_type"] == "bert", hp["model_type"]
arch = gguf.MODEL_ARCH.BERT
w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])

n_layer = hp["num_hidden_layers"]
w.add_name(src.name)
w.add_block_count(n_layer)
w.add_context_length(hp["max_position_embeddings"])
w.add_embedding_length(hp["hidden_size"])
w.add_feed_forward_length(hp["intermediate_size"])
w.add_head_count(hp["num_attention_heads"])
w.add_layer_norm_eps(hp["layer_norm_eps"])
w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if ftype == "f16" else gguf.LlamaFileType.ALL_F32)
w.add_causal_attention(False)

# pooling from sentence-transformers modules.json
pool = None
mp = src / "modules.json"
if mp.is_file():
    for m in json.loads(mp.read_text()):
        if m["type"] == "sentence_transformers.models.Pooling":
            pc = json.loads((src / m["path"] / "config.json").read_text())
            if pc.get("pooling_mode_mean_tokens"):
                pool = gguf.PoolingType.MEAN
            elif pc.get("pooling_mode_cls_token"):
                pool = gguf.PoolingType.CLS
            elif pc.get("pooling_mode_lasttoken"):
                pool = gguf.PoolingType.LAST
if pool is not None:
    w.add_pooling_type(pool)

# vocab: WordPiece, "phantom space" form as llama.cpp expects
tj = json.loads((src / "tokenizer.json").read_text())
vocab = tj["model"]["vocab"]  # token -> id
n_vocab = hp["vocab_size"]
rev = {i: t for t, i in vocab.items()}
added = {a["id"]: a for a in tj.get("added_tokens", [])}
tokens, toktypes = [], []
for i in range(n_vocab):
    if i not in rev:
        tokens.append(f"[PAD{i}]"); toktypes.append(gguf.TokenType.UNUSED); continue
    t = rev[i]
    if i in added and added[i].get("special", False):
        tt = gguf.TokenType.CONTROL
    elif i in added:
        tt = gguf.TokenType.USER_DEFINED
    else:
        tt = gguf.TokenType.NORMAL
    if tt != gguf.TokenType.CONTROL:
        t = t[2:] if t.startswith("##") else "\u2581" + t
    tokens.append(t); toktypes.append(tt)
w.add_token_type_count(hp.get("type_vocab_size", 1))
w.add_tokenizer_model("bert")
w.add_tokenizer_pre("bert-bge")  # chkhsh of the uncased BERT WordPiece tokenizer (bge-small / MiniLM)
w.add_token_list(tokens)
w.add_token_types(toktypes)
gguf.SpecialVocab(src, n_vocab=len(tokens)).add_to_gguf(w)

# tensors
tmap = gguf.get_tensor_name_map(arch, n_layer)
sd = load_file(str(src / "model.safetensors"))
skip = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
for name, data in sd.items():
    if name.startswith("bert."):
        name = name[5:]
    if name.endswith(".gamma"): name = name[:-6] + ".weight"
    if name.endswith(".beta"): name = name[:-5] + ".bias"
    if name in skip or name.startswith("cls."):
        continue
    new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise SystemExit(f"cannot map tensor {name}")
    data = data.astype(np.float32)
    # 2D weights -> f16; 1D (norms/biases) stay f32
    # position/token-type tables are ggml_add()-ed to f32 activations -> must stay f32 (as upstream)
    if ftype == "f16" and data.ndim == 2 and new not in ("position_embd.weight", "token_types.weight"):
        data = data.astype(np.float16)
    w.add_tensor(new, data)

w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
print("wrote", out, len(sd), "tensors")
