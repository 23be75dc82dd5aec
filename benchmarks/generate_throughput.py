"""Generation throughput: model_foundry's generate() against transformers' generate() on the same
model and prompts, in one process, alternating, medians of several repeats. Greedy, no early stop.

    python benchmarks/generate_throughput.py [--config configs/python-stdlib.yaml] [--new-tokens 100] [--repeats 5] [--ragged]

--ragged: prompts of different lengths (16, 12, 8, 4 tokens), so that a batch is left-padded and masked on both sides.

The model is built from the config's model section with random weights (speed does not depend on
what the weights say); both sides must produce the same greedy tokens, which is checked.
"""
import argparse, statistics, sys, time
from pathlib import Path

import torch

from model_foundry.config import load_config
from model_foundry.generation import generate_batch_ids, generate_ids
from model_foundry.model import build_model, count_parameters

REPO = Path(__file__).resolve().parent.parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default=str(REPO/'configs'/'python-stdlib.yaml'))
    p.add_argument('--new-tokens', type=int, default=100)
    p.add_argument('--prompt-tokens', type=int, default=16)
    p.add_argument('--prompts', type=int, default=4)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--ragged', action='store_true', help='prompts of different lengths: batches are left-padded and masked')
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    V, T = cfg.tokenizer.vocab_size or 256, cfg.data.max_sequence_length
    assert a.prompt_tokens + a.new_tokens <= T, 'transformers generate cannot slide past the context'
    model = build_model(cfg.model, V, T, eos_token_id=0, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [max(1, a.prompt_tokens - 4 * (i % 4)) if a.ragged else a.prompt_tokens for i in range(a.prompts)]
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]

    def ours():
        return [generate_ids(model, pr, a.new_tokens, temperature=0) for pr in prompts]

    def theirs():
        out = []
        for pr in prompts:
            ids = torch.tensor([pr])
            r = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                               do_sample=False, pad_token_id=0)
            out.append(r[0, len(pr):].tolist())
        return out

    def ours_batched():
        return generate_batch_ids(model, prompts, a.new_tokens, temperature=0)

    def theirs_batched():
        L = max(lengths)
        ids = torch.tensor([[0] * (L - len(pr)) + pr for pr in prompts])  # left-padded, as transformers documents for generation
        mask = torch.tensor([[0] * (L - len(pr)) + [1] * len(pr) for pr in prompts])
        r = model.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                           do_sample=False, pad_token_id=0)
        return r[:, L:].tolist()

    assert ours() == theirs() == ours_batched(), 'greedy outputs differ'
    if theirs_batched() != ours_batched(): print('note: transformers batched gives other tokens than each prompt alone (padding)')
    fs = dict(ours=ours, transformers=theirs, ours_batched=ours_batched, transformers_batched=theirs_batched)
    times = {k: [] for k in fs}
    for _ in range(a.repeats):
        for name, f in fs.items():
            t = time.perf_counter(); f(); times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = sum(len(o) for o in ours())
    print(f'model: {count_parameters(model):,} parameters, context {T}; {a.prompts} prompts of {lengths} tokens x {a.new_tokens} new tokens, greedy, '
          f'torch threads {torch.get_num_threads()}')
    for k, v in med.items(): print(f'{k:>21}: {v:.3f} s, {n / v:,.0f} tokens/s')
    print(f'ratio one prompt at a time (ours / transformers tokens/s): {med["transformers"] / med["ours"]:.2f}x')
    print(f'ratio batched             (ours / transformers tokens/s): {med["transformers_batched"] / med["ours_batched"]:.2f}x')
    print(f'ours batched / transformers one at a time: {med["transformers"] / med["ours_batched"]:.2f}x')


if __name__ == '__main__':
    sys.exit(main())
