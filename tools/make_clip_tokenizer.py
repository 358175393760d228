"""Write the SD 2.x CLIP tokenizer files (vocab.json, merges.txt, configs) from CLIP's BPE merges file.

The SD 2.1 tokenizer is OpenAI CLIP's BPE (MIT licence); open_clip ships its merges as
``open_clip/bpe_simple_vocab_16e6.txt.gz``. The vocabulary is built the way CLIP builds it:
256 byte symbols, the same with ``</w>``, the first 48894 merges, then the two special tokens
(49408 entries). Padding is "!" (id 0), as SD 2.x and ``open_clip.tokenize`` pad.

    python tools/make_clip_tokenizer.py --bpe bpe_simple_vocab_16e6.txt.gz --out sr_common/configs/sd21_base/tokenizer
"""

import argparse
import gzip
import json
import os


def bytes_to_unicode():
    """CLIP's reversible byte → printable-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz (default: the one inside the installed open_clip)")
    p.add_argument("--out", required=True)
    p.add_argument("--verify", action="store_true", help="compare HF CLIPTokenizer (slow, fast) with open_clip")
    a = p.parse_args()
    if a.bpe is None:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
        if spec is None:
            p.error("--bpe not given and open_clip is not installed")
        a.bpe = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(a.bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(a.out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
               "unk_token": "<|endoftext|>"}
    with open(os.path.join(a.out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(a.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer",
                       add_prefix_space=False, errors="replace"), f, indent=2)
    print(f"{len(vocab)} tokens written to {a.out}")
    if a.verify:
        verify(a.out)


PROMPTS = ["a cat, grass, ,", "", "A photo of a Dog sitting on the beach at sunset, 8k, high-resolution",
           "clean, high-resolution, 8k", "baseball glove, nebula, ,", "tree, building, sky, cloud, road, car, person",
           "Hello   World.  (test) -- 1234 x 5678; don't stop?", "word " * 100]


def verify(folder):
    """HF CLIPTokenizer (slow and fast) ids == open_clip.tokenize ids, SD 2 style (77, pad "!" = 0)."""
    import open_clip
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    slow, fast = CLIPTokenizer.from_pretrained(folder), CLIPTokenizerFast.from_pretrained(folder)
    for text in PROMPTS:
        ref = open_clip.tokenize([text])[0].tolist()
        for tok in (slow, fast):
            ids = tok(text, max_length=77, padding="max_length", truncation=True).input_ids
            assert ids == ref, (type(tok).__name__, text, ids, ref)
    # known divergence, not a bug of these files: "!" is the pad token, and HF splits the text on special
    # tokens first, so "!!" becomes two "!" (0, 0) where open_clip gives the merged "!!</w>" (748)
    assert slow("!!").input_ids[1:3] == [0, 0] and open_clip.tokenize(["!!"])[0, 1].item() == 748
    print(f"verified: {len(PROMPTS)} prompts, slow and fast HF tokenizers == open_clip.tokenize")


if __name__ == "__main__":
    main()
