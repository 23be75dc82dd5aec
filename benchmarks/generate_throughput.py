"""Generation throughput: model_foundry's generate() against transformers' generate() on the same
model and prompts, in one process, alternating, medians of several repeats. Greedy, no early stop.

    python benchmarks/generate_throughput.py [--config configs/python-stdlib.yaml] [--new-tokens 100] [--repeats 5]

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
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    V, T = cfg.tokenizer.vocab_size or 256, cfg.data.max_sequence_length
    assert a.prompt_tokens + a.new_tokens <= T, 'transformers generate cannot slide past the context'
    model = build_model(cfg.model, V, T, eos_token_id=0, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, V, (a.prompt_tokens,), generator=g).tolist() for _ in range(a.prompts)]

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
        ids = torch.tensor(prompts)
        r = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                           do_sample=False, pad_token_id=0)
        return r[:, a.prompt_tokens:].tolist()

    assert ours() == theirs() == ours_batched(), 'greedy outputs differ'
    fs = dict(ours=ours, transformers=theirs, ours_batched=ours_batched, transformers_batched=theirs_batched)
    times = {k: [] for k in fs}
    for _ in range(a.repeats):
        for name, f in fs.items():
            t = time.perf_counter(); f(); times[name].append(time.perf_counter() - t)
    n = a.prompts * a.new_tokens
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f'model: {count_parameters(model):,} parameters, context {T}; {a.prompts} prompts x {a.new_tokens} new tokens, greedy, '
          f'torch threads {torch.get_num_threads()}')
    for k, v in med.items(): print(f'{k:>21}: {v:.3f} s, {n / v:,.0f} tokens/s')
    print(f'ratio one prompt at a time (ours / transformers tokens/s): {med["transformers"] / med["ours"]:.2f}x')
    print(f'ratio batched             (ours / transformers tokens/s): {med["transformers_batched"] / med["ours_batched"]:.2f}x')
    print(f'ours batched / transformers one at a time: {med["transformers"] / med["ours_batched"]:.2f}x')


if __name__ == '__main__':
    sys.exit(main())
