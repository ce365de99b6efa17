"""`tulu.py quantize`: an HF Llama folder written, file for file and byte for byte, as transformers
saves a model it loaded with bitsandbytes' load_in_4bit (NF4, double quantization): transformers
loads it as its own, llama.load_model without quantizing. Streamed: neither the model nor a whole
weight is ever in memory. A safetensors file opens with every tensor's offsets, yet a quant_state
(JSON holding the mean of the scales) has its length only once its weight is quantized: tensors go
to a scratch file first, the file is written at the end.
"""
import json
import os
import tempfile

import torch

import nf4
from llama import (LlamaConfig, SAFE_INDEX, SAFE_NAMES, TuluError, atomic_write, checkpoint_files,
                   decoder_linear, read_json, write_json)
from machinery.checks import check_output
from machinery.outputs import TOKENIZER_FILES, copy_tokenizer

# transformers' BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, bf16 compute): QLoRA's settings
BNB_WRITTEN = {**nf4.BNB_CONFIG, "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16",
               "_load_in_4bit": True, "_load_in_8bit": False, "llm_int8_enable_fp32_cpu_offload": False,
               "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0}
SAFE_ORDER = ("F64", "F32", "BF16", "F16", "U8")  # safetensors' order of tensors in a file: dtype, then name


def bnb_tensors(key: str, q: nf4.NF4Tensor) -> dict[str, torch.Tensor]:
    """The tensors transformers saves for the 4-bit weight `key` (bitsandbytes' QuantState.as_dict)."""
    state = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": str(q.dtype).removeprefix("torch."),
             "shape": list(q.shape), "nested_blocksize": nf4.DQ_BLOCKSIZE, "nested_dtype": "float32",
             "nested_offset": q.nested_offset.item()}
    return {key: q.packed.view(-1, 1), f"{key}.absmax": q.absmax, f"{key}.quant_map": nf4.code_books()[0],
            f"{key}.nested_absmax": q.nested_absmax, f"{key}.nested_quant_map": nf4.code_books()[2],
            f"{key}.{nf4.BNB_STATE}": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)}


def save_file_streamed(fname: str, tensors) -> dict[str, int]:
    """Write the (key, tensor) pairs of an iterable as safetensors' save_file does (widest dtype first,
    each then at a multiple of its width, and by name), through a scratch file. Each key's bytes."""
    entries = []  # (place of the dtype in SAFE_ORDER, key, shape, offset in the scratch file, bytes)
    with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(fname))) as scratch:
        for key, t in tensors:
            rank = SAFE_ORDER.index(SAFE_NAMES[t.dtype])
            entries.append((rank, key, list(t.shape), scratch.tell(), t.nbytes))
            scratch.write(t.contiguous().view(-1).view(torch.uint8).numpy())
        header, end = {"__metadata__": {"format": "pt"}}, 0
        for rank, key, shape, _, n in sorted(entries):
            header[key] = {"dtype": SAFE_ORDER[rank], "shape": shape, "data_offsets": [end, end + n]}
            end += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts at a multiple of 8 bytes

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(len(text).to_bytes(8, "little") + text)
                for *_, at, n in sorted(entries):
                    scratch.seek(at)
                    while n:
                        n -= f.write(scratch.read(min(n, 1 << 24)))
        atomic_write(fname, write)
    return {key: n for _, key, _, _, n in entries}


def quantized_tensors(fname: str):
    """(key, tensor) of the safetensors file `fname`, each decoder weight as bnb_tensors'."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(fname, framework="pt", backend="pread") as f, nf4.SafetensorsSlices(fname) as raw:
            for key in (k for k in f.keys() if not k.endswith("rotary_emb.inv_freq")):  # old files' RoPE
                if decoder_linear(key):  # quantized from its stored dtype, as transformers loads it
                    yield from bnb_tensors(key, raw.read_nf4(key)).items()
                else:
                    yield key, f.get_tensor(key)
    except SafetensorError as e:
        raise TuluError(f"{fname}: not a valid safetensors file ({e})") from None


def quantize_folder(path: str, out_dir: str):
    """`path` as a bitsandbytes 4-bit folder in `out_dir`, with its tokenizer and generation config."""
    files, config_file = checkpoint_files(path), os.path.join(path, "config.json")
    if "quantization_config" in LlamaConfig.from_json(config_file).extra:
        raise TuluError(f"{config_file}: already 4-bit (quantization_config): quantize the base")
    os.makedirs(out_dir, exist_ok=True)
    weight_map, total = {}, 0  # file for file, and an index as save_model writes it
    for f in files:
        written = save_file_streamed(os.path.join(out_dir, os.path.basename(f)), quantized_tensors(f))
        weight_map |= dict.fromkeys(written, os.path.basename(f))
        total += sum(written.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(os.path.join(out_dir, SAFE_INDEX), index)
    config = {**read_json(config_file, "a config"), "quantization_config": BNB_WRITTEN}
    write_json(os.path.join(out_dir, "config.json"), config)
    copy_tokenizer(path, out_dir, (*TOKENIZER_FILES, "generation_config.json"))


def flags(p):
    p.add_argument("--model", required=True, help="the HF Llama folder to quantize")
    p.add_argument("--output", required=True, help="where to write its bitsandbytes 4-bit folder")


def command(args):
    check_output(args.output, args.model)
    quantize_folder(args.model, args.output)
    print(f"wrote {args.output}: {args.model} in 4-bit NF4, double-quantized, as bitsandbytes writes it")
