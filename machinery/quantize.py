"""`tulu.py quantize`: an HF Llama folder written as a bitsandbytes 4-bit folder, as
transformers saves a model it loaded with load_in_4bit (NF4 with double quantization;
nf4.bnb_tensors gives one weight's tensors), so that transformers + bitsandbytes load it as
their own and tulu's load_model reads it next time without quantizing.

Streamed: each decoder weight is read a slice at a time, quantized and written at once, the
other tensors are copied one at a time, so neither the model nor a whole weight is ever in
memory. A safetensors file opens with a header holding every tensor's offsets, yet a 4-bit
weight's quant_state (JSON holding the mean of its scales) has a length only once the weight
is quantized: so tensors go to scratch files (SafetensorsWriter), and the header and the data
follow at the end. Each file of the checkpoint gives one file of the same name.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

import nf4
from llama import LlamaConfig, SAFE_INDEX, TuluError, atomic_write, checkpoint_files, decoder_linear, write_json
from machinery.outputs import copy_tokenizer

# what transformers writes for BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
# bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16): QLoRA's settings
BNB_WRITTEN = {**nf4.BNB_CONFIG, "_load_in_4bit": True, "_load_in_8bit": False,
               "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_use_double_quant": True,
               "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
               "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0}
SAFE_NAMES = {t: name for name, t in nf4.SAFE_DTYPES.items()} | {torch.uint8: "U8"}
SAFE_ORDER = ("F64", "F32", "BF16", "F16", "U8")  # of tensors in safetensors' files: by dtype, then name


class SafetensorsWriter:
    """A safetensors file written a tensor at a time, byte for byte as safetensors' save_file
    writes the same tensors: each goes to a scratch file as it comes, and at the end the header
    and the tensors follow in safetensors' order (widest dtype first, so that every tensor
    starts at a multiple of its width; then by name), copied a few MiB at a time."""

    def __init__(self, fname: str):
        self.fname, self.entries = fname, []  # (dtype's place in SAFE_ORDER, key, shape, offset, bytes)
        self.scratch = tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(fname)))

    def __enter__(self):
        return self

    def __exit__(self, error, *_):
        if error is None:
            atomic_write(self.fname, self.write)
        self.scratch.close()

    def add(self, key: str, t: torch.Tensor):
        rank = SAFE_ORDER.index(SAFE_NAMES[t.dtype])
        self.entries.append((rank, key, list(t.shape), self.scratch.tell(), t.nbytes))
        self.scratch.write(t.contiguous().view(-1).view(torch.uint8).numpy())

    def write(self, tmp: str):
        header, end = {"__metadata__": {"format": "pt"}}, 0
        for rank, key, shape, _, n in sorted(self.entries):
            header[key] = {"dtype": SAFE_ORDER[rank], "shape": shape, "data_offsets": [end, end + n]}
            end += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts at a multiple of 8 bytes
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for *_, at, n in sorted(self.entries):
                self.scratch.seek(at)
                while n:
                    n -= f.write(self.scratch.read(min(n, 1 << 24)))


def quantize_file(fname: str, out: str) -> dict[str, int]:
    """Write the safetensors file `fname` to `out`, each decoder weight in 4-bit; each key written, its bytes."""
    from safetensors import SafetensorError, safe_open
    written = {}
    try:
        with safe_open(fname, framework="pt", backend="pread") as f, nf4.SafetensorsSlices(fname) as raw, \
                SafetensorsWriter(out) as w:
            for key in (k for k in f.keys() if not k.endswith("rotary_emb.inv_freq")):  # old files' RoPE
                if decoder_linear(key):  # quantized from its stored dtype, as transformers loads it
                    dtype = nf4.SAFE_DTYPES.get(raw.header[key]["dtype"])
                    q = nf4.quantize_nf4_slices(raw.slices(key, nf4.slice_size()), raw.shape(key), dtype)
                    tensors = nf4.bnb_tensors(key, q)
                else:
                    tensors = {key: f.get_tensor(key)}
                for k, t in tensors.items():
                    w.add(k, t)
                    written[k] = t.nbytes
                nf4.release_freed_memory()
    except SafetensorError as e:
        raise TuluError(f"{fname}: not a valid safetensors file ({e})") from None
    return written


def quantize_folder(path: str, out_dir: str):
    """`path` as a bitsandbytes 4-bit folder in `out_dir`, with its tokenizer and generation config."""
    files, config_file = checkpoint_files(path), os.path.join(path, "config.json")
    LlamaConfig.from_json(config_file)  # a Llama that tulu reads
    with open(config_file) as f:
        config = json.load(f)
    if "quantization_config" in config:
        raise TuluError(f"{config_file}: already quantized (quantization_config); quantize the full-precision base")
    os.makedirs(out_dir, exist_ok=True)
    sizes = {os.path.basename(f): quantize_file(f, os.path.join(out_dir, os.path.basename(f))) for f in files}
    if len(files) > 1:  # the index, as save_model writes it
        weight_map = {k: name for name, written in sizes.items() for k in written}
        total = sum(n for written in sizes.values() for n in written.values())
        write_json(os.path.join(out_dir, SAFE_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(os.path.join(out_dir, "config.json"), {**config, "quantization_config": BNB_WRITTEN})
    copy_tokenizer(path, out_dir, ("generation_config.json",))
    copy_tokenizer(path, out_dir)
