"""vlmedge's SmolVLM-256M-shaped forms against OpenVINO (optimum-intel) and llama.cpp (libmtmd): one folder, the same
images and questions, interleaved rounds, each peer in its own environment.

    bash benchmarks/peers/envs.sh env-openvino llama.cpp      # once: the peers' environments and llama.cpp's build
    python benchmarks/peers/smolvlm_peers.py runs/peers256 [--rounds 3] [--questions 8]
    python benchmarks/peers/smolvlm_peers.py runs/peers256x3 --text-scale 3 --rounds 0   # agreement only
    python benchmarks/peers/smolvlm_peers.py runs/peers2.2bx3 --size 2.2b --text-scale 3 --row 'vlmedge int8' ...

The folder (OUT/model): SmolVLM-256M's published sizes (`--size 500m|2.2b`: those models'; `benchmarks/smolvlm_256m.py`
builds the same) at full depth, random weights, and a byte-level BPE tokenizer of the published vocabulary size
(49152) trained on this Python's standard library source, with SmolVLM's special tokens and chat template, so that
llama.cpp's converter can take it. Its processor config asks for one frame (no splitting, longest edge the vision's
image size: 512 px, 384 at 2.2B), which every runtime here reads from the folder.
llama.cpp's converter does not know this tokenizer's pre-tokenizer hash (it recognises published tokenizers only)
and is told it is SmolLM's ("smollm": the same byte-level BPE with single digits); everything else is its own.

Rows: PyTorch eager fp32 (Hugging Face `generate`), vlmedge's fp32 export, INT8 dynamic and INT4 (accuracy level 4,
vision INT8); OpenVINO int8 (8-bit weights, static int8 vision: its documented SmolVLM recipe) and int4 (4-bit
weights), and int8 again with the f32 inference hint (OpenVINO computes what is not quantized in bf16 on a CPU with
AVX512_BF16 or AMX: that row shows what bf16 buys it); llama.cpp Q8_0 and Q4_K_M (text model), each with the mmproj in Q8_0. Each row once per round (a
subprocess per peer per round; vlmedge's and eager in this process), 2 threads (this host has 2 cores: all
threads), batch 1, the scenarios of `vlmedge bench`: vision, ttft, decode per token, a 16-token answer (EOS ignored).
Peers are timed by their own means: OpenVINO by wall clock around its calls (decode = (answer - ttft) / 15),
llama.cpp by its own perf lines (image encode, prompt eval, eval per token; model loading excluded).

Agreement (random weights: the accuracy proxy): each row's 16 greedy tokens, as text, against PyTorch eager fp32's
on the same questions; identical answers and the mean common prefix in tokens. llama.cpp's F32 GGUF is also
compared, which shows what its own prompt and image path changes before any quantization.
Writes OUT/results.json (`--results NAME` another file; `--row NAME` times only the rows named, besides eager).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

from provenance import Provenance  # noqa: E402

from vlmedge.families.generative import ANSWER_TOKENS  # noqa: E402  (the latency scenarios' answer length)
from vlmedge.runtime.measure import stats  # noqa: E402

PEERS = ROOT / "runs" / "peers"
LLAMA = PEERS / "llama-build" / "bin"
VOCAB = 49152  # SmolVLM-256M's published vocabulary (SmolLM2's tokenizer)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bpe_tokenizer(vocab_size: int = VOCAB, files: int | None = None):
    """A byte-level BPE (single digits, as SmolLM2's) trained on this Python's standard library source (its first
    `files` files; None: all), with SmolVLM's special tokens, tile tokens and chat template: the shape of the real
    tokenizer, local text only."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vlmedge.families.generative.model import CHAT_TEMPLATE, SPECIAL, tile_token

    std = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(std.rglob("*.py")) if "site-packages" not in p.parts]
    texts = texts[:files] if files else texts
    tiles = [tile_token(r, c) for r in range(1, 7) for c in range(1, 7)]
    special = list(SPECIAL.values()) + tiles
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIAL["unk"], pad_token=SPECIAL["pad"],
                                   eos_token=SPECIAL["end"], bos_token=SPECIAL["start"])
    fast.add_special_tokens({"additional_special_tokens": [SPECIAL[k] for k in ("around", "global", "image")] + tiles})
    fast.chat_template = CHAT_TEMPLATE
    return fast


PEER_FILES = {"openvino": (PEERS / "env-openvino" / "bin" / "python",),
              "llama.cpp": (PEERS / "env-gguf" / "bin" / "python", LLAMA / "llama-mtmd-cli", LLAMA / "llama-quantize")}
"""What each peer needs built (`envs.sh env-openvino llama.cpp`) before it can run."""


def peer_missing(peer: str) -> str | None:
    """The first file `peer` needs that is not built (relative to the repository), or None."""
    return next((str(f.relative_to(ROOT)) for f in PEER_FILES[peer] if not f.exists()), None)


def build_folder(model: Path, text_scale: float = 1.0, quick: bool = False, size: str = "256m") -> None:
    """The folder of a published SmolVLM's sizes (`size`: `test_generative.SMOLVLM_SHAPES`); `text_scale` multiplies
    the decoder's matrices (embedding included): at the default random init every question gets the same greedy
    answer (" Mis" 16 times at 256M), at 3x the answer depends on the question and agreement between runtimes means
    something. `quick`: 1 vision and 1 decoder layer, 1000 tokens."""
    from test_generative import SMOLVLM_SHAPES, smolvlm_folder

    model.mkdir(parents=True, exist_ok=True)
    smolvlm_folder(model, size, vision_layers=1 if quick else None, text_layers=1 if quick else None,
                   tokenizer=bpe_tokenizer(1000, files=40) if quick else bpe_tokenizer())
    if text_scale != 1.0:
        from safetensors.torch import load_file, save_file

        weights = model / "model.safetensors"
        tensors = load_file(weights)
        save_file({k: v * text_scale if v.dim() == 2 and "text_model" in k else v for k, v in tensors.items()},
                  weights, metadata={"format": "pt"})
    pre = model / "preprocessor_config.json"
    one_frame = {"do_image_splitting": False, "size": {"longest_edge": SMOLVLM_SHAPES[size]["vision"]["image_size"]}}
    pre.write_text(json.dumps({**json.loads(pre.read_text()), **one_frame}, indent=2))
    peer_ready(model)


def peer_ready(model: Path) -> None:
    """Make a vlmedge-written SmolVLM folder readable by the peers' converters, in place: spellings transformers 4.57
    reads and the fields SmolVLM-256M-Instruct publishes."""
    # transformers 5 writes its own class name and a list of extra special tokens; the OpenVINO environment's
    # transformers 4.57 reads the older spellings (which transformers 5 reads too)
    tc = model / "tokenizer_config.json"
    config = json.loads(tc.read_text())
    config["additional_special_tokens"] = config.pop("extra_special_tokens", config.get("additional_special_tokens", []))
    tc.write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    # as SmolVLM-256M-Instruct publishes them: its text config names its architecture (llama.cpp's converter
    # picks its text model class by it), and transformers' processor otherwise assumes Idefics3's 169 image tokens
    cfg = model / "config.json"
    config = json.loads(cfg.read_text())
    config["text_config"]["architectures"] = ["VLlama3ForCausalLM"]
    cfg.write_text(json.dumps(config, indent=2))
    vision = config["vision_config"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 // config.get("scale_factor", 1) ** 2
    (model / "processor_config.json").write_text(json.dumps({"image_seq_len": tokens,
                                                             "processor_class": "Idefics3Processor"}))


def write_prompts(out: Path, questions: int) -> tuple[Path, Path]:
    """Held-out shapes scenes at the latency scenarios' camera size (1024x768) with a question each: the peers time
    the first (vlmedge's rows time `latency_inputs`, a scene of the same size: the same work, one 512 px frame),
    all of them are asked for agreement; 16 training scenes for OpenVINO's static calibration."""
    from PIL import Image

    from vlmedge.families.generative import LATENCY_IMAGE
    from vlmedge.families.generative.data import open_vqa

    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)

    def save(split: str, n: int, seed: int, name: str) -> Path:
        ds = open_vqa("shapes:64", split, resolution=64, seed=seed)
        items = ds.eval_items(n, seed)
        rows = []
        for k, item in enumerate(items):
            path = folder / f"{name}-{k}.png"
            Image.fromarray(ds.images([item.index])[0]).resize(LATENCY_IMAGE, Image.BICUBIC).save(path)
            rows.append({"image": str(path.resolve()), "question": item.question})
        (folder / f"{name}.json").write_text(json.dumps(rows, indent=1))
        return folder / f"{name}.json"

    return save("val", questions, 0, "eval"), save("train", 16, 1, "calibration")


def vlmedge_forms(model: Path, out: Path, forms: tuple[str, ...] = ("int8", "int4-acc4"), quick: bool = False
                  ) -> dict[str, Path]:
    from smolvlm_256m import FORMS, vlmedge

    onnx_dir = out / "vlmedge-fp32"
    if not (onnx_dir / "manifest.json").is_file():
        log("vlmedge export")
        vlmedge("export", str(model), "--out", str(onnx_dir), "--no-eval",
                *(("--no-tune-threads", "--parity-questions", "2") if quick else ()))
    folders = {"vlmedge fp32": onnx_dir}
    for form in forms:
        dest = out / f"vlmedge-{form}"
        if not (dest / "manifest.json").is_file():
            log(f"vlmedge quantize {form}")
            vlmedge("quantize", str(onnx_dir), "--out", str(dest), "--no-eval", "--no-tune-threads",
                    "--agreement-questions", "0", "--calibration-batches", "2", "--batch-size", "2", *FORMS[form])
        folders[f"vlmedge {form}"] = dest
    return folders


def openvino(cmd: str, *args: str, capture: bool = True):
    """`openvino_smolvlm.py CMD ARGS` in OpenVINO's environment; its last stdout line as JSON when captured. A failure
    raises RuntimeError with the script's last error line."""
    script = ROOT / "benchmarks" / "peers" / "openvino_smolvlm.py"
    p = subprocess.run([str(PEERS / "env-openvino" / "bin" / "python"), str(script), cmd, *map(str, args)],
                       capture_output=capture, text=True)
    if p.returncode:
        lines = (p.stderr or "").strip().splitlines()
        raise RuntimeError(f"openvino_smolvlm.py {cmd} failed ({p.returncode}): {lines[-1] if lines else ''}")
    return json.loads(p.stdout.strip().splitlines()[-1]) if capture else None


def openvino_forms(model: Path, out: Path, calibration: Path, forms: tuple[str, ...] = ("int8", "int4")
                   ) -> dict[str, tuple[Path, str]]:
    """Row name -> (folder, OpenVINO inference precision hint; "" its default). OpenVINO's CPU plugin computes what
    is not quantized in bf16 where the CPU has AVX512_BF16 or AMX, in f32 elsewhere: the int8 form is also timed
    with the f32 hint, ONNX Runtime's arithmetic on any CPU (fp32, where asked, runs with that hint too)."""
    folders = {}
    for form in forms:
        dest = out / f"openvino-{form}"
        if not (dest / "openvino_language_model.xml").is_file():
            log(f"openvino export {form}")
            openvino("export", model, dest, "--form", form, "--calibration", calibration, capture=False)
        folders[f"openvino {form}"] = (dest, "f32" if form == "fp32" else "")
    if "int8" in forms:
        folders["openvino int8 f32"] = (out / "openvino-int8", "f32")
    return folders


def openvino_answers(folder: Path, prompts: Path, threads: int, precision: str, until_eos: bool = False
                     ) -> list[list[int]]:
    """OpenVINO's greedy answer ids for every prompt (`openvino_smolvlm.answers`)."""
    return openvino("answer", folder, prompts, "--threads", threads, "--precision", precision,
                    *(["--until-eos"] if until_eos else []))


def llama_forms(model: Path, out: Path) -> dict[str, tuple[Path, Path]]:
    """F32 text GGUF and Q8_0 mmproj by llama.cpp's converter, then llama-quantize to Q8_0 and Q4_K_M."""
    src = next((PEERS / "dl").glob("llama_cpp_python-*/vendor/llama.cpp"))
    python = PEERS / "env-gguf" / "bin" / "python"
    dest = out / "gguf"
    dest.mkdir(parents=True, exist_ok=True)
    convert = ("import sys, runpy; sys.path.insert(0, sys.argv[1]); import conversion.base as b; "
               "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'smollm'; "
               "script = sys.argv[1] + '/convert_hf_to_gguf.py'; sys.argv = [script] + sys.argv[2:]; "
               "runpy.run_path(script, run_name='__main__')")
    f32, mmproj = dest / "model-f32.gguf", dest / "mmproj-q8_0.gguf"
    if not f32.is_file():
        log("llama.cpp convert (text, f32)")
        subprocess.run([str(python), "-c", convert, str(src), str(model), "--outtype", "f32", "--outfile", str(f32)],
                       check=True)
    if not mmproj.is_file():
        log("llama.cpp convert (mmproj, q8_0)")
        subprocess.run([str(python), "-c", convert, str(src), str(model), "--mmproj", "--outtype", "q8_0",
                        "--outfile", str(mmproj)], check=True)
    forms = {"llama.cpp f32": (f32, mmproj)}
    for q in ("Q8_0", "Q4_K_M"):
        path = dest / f"model-{q}.gguf"
        if not path.is_file():
            log(f"llama.cpp quantize {q}")
            subprocess.run([str(LLAMA / "llama-quantize"), str(f32), str(path), q], check=True,
                           stdout=subprocess.DEVNULL)
        forms[f"llama.cpp {q}"] = (path, mmproj)
    return forms


def llama_run(gguf: Path, mmproj: Path, item: dict, threads: int, tokens: int = ANSWER_TOKENS,
              until_eos: bool = False) -> tuple[str, dict]:
    """One llama-mtmd-cli run (greedy, `tokens` new tokens, EOS ignored; with `until_eos` up to `tokens`, stopping at
    EOS): its answer text and timings in ms. The CLI
    prints no perf summary in single-turn mode, so: `encode` = its "mtmd batch encoding done in X ms" lines (one
    per frame), `work` = the process's wall clock minus its log's timestamp of the first image encoding (model
    loading and process start excluded; exit included)."""
    t = time.perf_counter()
    p = subprocess.run([str(LLAMA / "llama-mtmd-cli"), "-m", str(gguf), "--mmproj", str(mmproj), "--image",
                        item["image"], "-p", item["question"], "-n", str(tokens), "--temp", "0",
                        "-t", str(threads), "-tb", str(threads), "--no-warmup", "-c", "1024",
                        *([] if until_eos else ["--ignore-eos"])],
                       capture_output=True, text=True, errors="replace")  # a token may end inside a UTF-8 character
    wall = (time.perf_counter() - t) * 1e3
    if p.returncode:
        raise RuntimeError(f"llama-mtmd-cli failed ({p.returncode}): {p.stderr[-2000:]}")
    encodes = [float(x) for x in re.findall(r"mtmd batch encoding done in ([\d.]+) ms", p.stderr)]
    start = re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I encoding mtmd batch", p.stderr, re.M)
    if not encodes or not start:
        raise RuntimeError(f"llama-mtmd-cli printed no image encoding lines: {p.stderr[-2000:]}")
    m, sec, ms, us = (int(x) for x in start.groups())
    start_ms = (m * 60 + sec) * 1e3 + ms + us / 1e3
    return p.stdout.strip(), {"encode": sum(encodes), "frames": len(encodes), "work": wall - start_ms}


def llama_timer(gguf: Path, mmproj: Path, item: dict, threads: int, runs: int):
    """`runs` pairs of CLI runs (1 token, then 16): ttft = the first's work, answer = the second's, vision = the
    image encodings of the 16-token run, decode = the difference of the two runs' work after their image encoding,
    over 15 (the encoding varies by hundreds of ms between runs; 15 decode steps are tens)."""
    def fn() -> dict:
        samples = []
        for _ in range(runs):
            one, whole = llama_run(gguf, mmproj, item, threads, 1)[1], llama_run(gguf, mmproj, item, threads)[1]
            steps = (whole["work"] - whole["encode"]) - (one["work"] - one["encode"])
            samples.append({"vision": whole["encode"], "ttft": one["work"], "answer": whole["work"],
                            "decode": steps / (ANSWER_TOKENS - 1), "frames": whole["frames"]})
        rec = {sc: stats([s[sc] for s in samples]) for sc in ("vision", "ttft", "decode", "answer")}
        return {**rec, "tokens_per_s": ANSWER_TOKENS / (rec["answer"]["p50_ms"] / 1e3),
                "input_image": {"frames": samples[0]["frames"]}}
    return fn


def openvino_timer(folder: Path, prompts: Path, threads: int, runs: int, precision: str = ""):
    def fn() -> dict:
        return openvino("time", folder, prompts, "--threads", threads, "--runs", runs, "--precision", precision)
    return fn


def agreement(reference: list[str], answers: list[str], tokenizer) -> dict:
    prefix = []
    for ref, ans in zip(reference, answers):
        a, b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (ref, ans))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix.append(n)
    return {"identical": sum(r.strip() == a.strip() for r, a in zip(reference, answers)), "of": len(reference),
            "mean_common_prefix_tokens": statistics.mean(prefix) if prefix else 0.0}


def answers_all(vlm, family, folders, ov, llama, prompts: list[dict], prompts_path: Path, threads: int) -> dict:
    """Greedy 16-token answers (EOS ignored) as text, per row."""
    import torch
    from PIL import Image

    tok = vlm.tokenizer
    out = {}
    eager = family.adapter(vlm)
    rows = []
    for item in prompts:
        frames, prompt = eager.inputs(Image.open(item["image"]), item["question"])
        ids, pixels = torch.tensor([prompt]), torch.from_numpy(frames)[None]
        with torch.inference_mode():
            gen = vlm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                     pixel_attention_mask=torch.ones(pixels.shape[:2] + pixels.shape[3:],
                                                                     dtype=torch.bool),
                                     max_new_tokens=ANSWER_TOKENS, min_new_tokens=ANSWER_TOKENS, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
        rows.append(tok.decode(gen[0, len(prompt):], skip_special_tokens=False))
    out["torch eager fp32"] = rows
    for name, folder in folders.items():
        gen = family.adapter(folder, threads=threads)
        rows = []
        for item in prompts:
            frames, prompt = gen.inputs(Image.open(item["image"]), item["question"])
            rows.append(tok.decode(gen.runtime.generate(frames, prompt, ANSWER_TOKENS, stop_at_eos=False),
                                   skip_special_tokens=False))
        out[name] = rows
    for name, (folder, precision) in ov.items():
        out[name] = [tok.decode(ids, skip_special_tokens=False)
                     for ids in openvino_answers(folder, prompts_path, threads, precision)]
    for name, (gguf, mmproj) in llama.items():
        out[name] = [llama_run(gguf, mmproj, item, threads)[0] for item in prompts]
    return out


def main(out: Path, rounds: int, questions: int, threads: int = 2, text_scale: float = 1.0,
         rows: tuple[str, ...] = (), results_file: str = "results.json", quick: bool = False, size: str = "256m"
         ) -> int:
    import torch
    from generative import time_interleaved

    from vlmedge import families
    from vlmedge.families.generative import LATENCY_IMAGE
    from vlmedge.runtime.measure import MeasureConfig

    run = Provenance.start()
    asked = lambda prefix: not rows or any(r.startswith(prefix) for r in rows)  # noqa: E731
    missing = [m for m in (peer_missing(p) for p in PEER_FILES if asked(p)) if m]
    if missing:
        print(f"error: {missing[0]} not found: run `bash benchmarks/peers/envs.sh env-openvino llama.cpp` first "
              "(or time vlmedge's rows alone: --row 'vlmedge int8')", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "config.json").is_file():
        log(f"building the folder (byte-level BPE of 49152 tokens, SmolVLM-{size.upper()} sizes)")
        build_folder(model, text_scale, quick, size)
    prompts_path, calibration = write_prompts(out, questions)
    kept = lambda forms: {k: v for k, v in forms.items() if not rows or k in rows}  # noqa: E731
    forms = vlmedge_forms(model, out, tuple(f for f in ("int8", "int4-acc4") if asked(f"vlmedge {f}")), quick)
    folders = kept(forms)
    ov = kept(openvino_forms(model, out, calibration, tuple(f for f in ("int8", "int4") if asked(f"openvino {f}")))
              ) if asked("openvino") else {}
    llama = kept(llama_forms(model, out)) if asked("llama.cpp") else {}

    torch.set_num_threads(threads)
    family = families.of(model)
    vlm = family.load(model)
    prompts = json.loads(prompts_path.read_text())
    log(f"agreement on {len(prompts)} questions")
    texts = answers_all(vlm, family, folders, ov, llama, prompts, prompts_path, threads)
    agree = {name: agreement(texts["torch eager fp32"], rows, vlm.tokenizer) for name, rows in texts.items()}
    # llama.cpp's own prompt and image path (two frames: it always adds a tile) changes the answer at F32 already
    own = {name: agreement(texts["llama.cpp f32"], rows, vlm.tokenizer) for name, rows in texts.items()
           if name.startswith("llama.cpp ")} if "llama.cpp f32" in texts else {}

    config = json.loads((model / "config.json").read_text())  # the folder's sizes (an existing one is kept as is)
    results = {"shape": {"vision_width": config["vision_config"]["hidden_size"],
                         "image_size": config["vision_config"]["image_size"],
                         "text_width": config["text_config"]["hidden_size"],
                         "text_layers": config["text_config"]["num_hidden_layers"]},
               "threads": threads, "rounds": rounds, "questions": len(prompts),
               "text_scale": text_scale, "answers": texts, "agreement": agree, "llama_cpp_vs_its_f32": own,
               # 1 means the random weights answer every question alike: agreement then says little
               "distinct_reference_answers": len(set(texts["torch eager fp32"])),
               "versions": peer_versions(asked("openvino"), asked("llama.cpp")), "quick": quick}
    if rounds == 0:  # agreement only
        run.write(out / results_file, results)
        print(json.dumps({k: results[k] for k in ("agreement", "llama_cpp_vs_its_f32", "distinct_reference_answers")},
                         indent=1))
        return 0
    cfg = families.configure(MeasureConfig, {"warmup": 0 if quick else 1, "min_runs": 2 if quick else 3,
                                             "min_seconds": 0.0, "threads": threads,
                                             "image_splitting": "as-folder"}, family)
    inputs = family.latency_inputs(family.adapter(forms["vlmedge fp32"], open_sessions=False), 1)
    extra = {name: openvino_timer(f, prompts_path, threads, 3, precision) for name, (f, precision) in ov.items()}
    extra.update({name: llama_timer(g, m, prompts[0], threads, 3) for name, (g, m) in llama.items()
                  if name != "llama.cpp f32"})
    log(f"timing: {rounds} interleaved rounds")
    table = time_interleaved(family, {"torch eager fp32": vlm}, folders, inputs, cfg, rounds, extra=extra)
    eager = table["torch eager fp32"]["answer"]["p90_ms"]
    for name, row in table.items():
        row["answer_p90_vs_eager"] = eager / row["answer"]["p90_ms"]
        row["agreement"] = agree.get(name)
    results.update({"input": {"image": list(LATENCY_IMAGE), "frames": 1, "question": prompts[0]["question"]},
                    "rows": table})
    run.write(out / results_file, results)
    print(markdown(table))
    return 0


def peer_versions(openvino: bool = True, llama: bool = True) -> dict:
    """The versions of the peers timed (their environments' own)."""
    out = {}
    if openvino:
        p = subprocess.run([str(PEERS / "env-openvino" / "bin" / "python"), "-c",
                            "import openvino, nncf, optimum.intel.version as v, transformers; "
                            "print(openvino.__version__, nncf.__version__, v.__version__, transformers.__version__)"],
                           capture_output=True, text=True)
        out.update(zip(("openvino", "nncf", "optimum-intel", "transformers (openvino env)"), p.stdout.split()))
    if llama:
        src = next((PEERS / "dl").glob("llama_cpp_python-*"), None)
        out["llama.cpp"] = f"vendored in {src.name}" if src else None
    return out


def markdown(table: dict) -> str:
    lines = ["| row | vision | TTFT | decode / token | 16-token answer | answer p90 vs eager | agreement |",
             "|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        a = r.get("agreement") or {}
        cells = [f"{r[sc]['p50_ms']:.0f} / {r[sc]['p90_ms']:.0f}" if sc != "decode" else
                 f"{r[sc]['p50_ms']:.1f} / {r[sc]['p90_ms']:.1f}" for sc in ("vision", "ttft", "decode", "answer")]
        agree = f"{a['identical']}/{a['of']} (prefix {a['mean_common_prefix_tokens']:.1f})" if a else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['answer_p90_vs_eager']:.2f}x | {agree} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("runs/peers256"))
    ap.add_argument("--rounds", type=int, default=3, help="0: agreement only")
    ap.add_argument("--text-scale", type=float, default=1.0,
                    help="multiply the new folder's decoder matrices (3: answers that depend on the question)")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--size", choices=("256m", "500m", "2.2b"), default="256m",
                    help="the published SmolVLM whose sizes a new folder gets (an existing OUT/model is kept)")
    ap.add_argument("--row", action="append", default=[],
                    help="time only these rows besides eager (repeatable; e.g. 'vlmedge int8', 'openvino int8 f32')")
    ap.add_argument("--results", default="results.json", help="file name under OUT")
    ap.add_argument("--quick", action="store_true", help="1 vision and 1 decoder layer, a 1000-token vocabulary, "
                    "2 questions, one round: checks the script (with --row 'vlmedge int8': without the peers)")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.questions = min(a.rounds, 1), min(a.questions, 2)
    sys.exit(main(a.out, a.rounds, a.questions, text_scale=a.text_scale, rows=tuple(a.row), results_file=a.results,
                  quick=a.quick, size=a.size))
