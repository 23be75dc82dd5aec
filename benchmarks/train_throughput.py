"""Training throughput of model_foundry's Learner against a plain PyTorch loop, side by side.

Same model (built from configs/shakespeare-char.yaml), same batches, same optimizer and schedule,
in one process. The two loops alternate step by step, and the ratio is the median over pairs of adjacent
steps, so that machine noise (a shared machine's load drifts over seconds) hits both alike. MFU is measured against an fp32 matmul ceiling measured here too.

    python benchmarks/train_throughput.py [--config configs/shakespeare-char.yaml] [--corpus PATH] [--rounds 5] [--steps 40]
        [--compile [--set training.compile_mode=max-autotune-no-cudagraphs]] [--attention eager|sdpa] [--set KEY=VALUE ...]

Ours trains through the lean GPT-2 forward (training.lean_forward, the default); --set training.lean_forward=false
compares the Learner alone, both through transformers' forward.
"""
import argparse, copy, statistics, sys, tempfile, time
from pathlib import Path

import torch
import torch.nn.functional as F

from model_foundry.config import load_config, resolve_config
from model_foundry.data import TokenBlocks, prepare
from model_foundry.samples import DataLoaders
from model_foundry.loop import Learner, one_step, MetricsLogger, ProgressBar, make_optimizer, make_scheduler
from model_foundry.compute import compile_for_training, lean_forward, set_attention
from model_foundry.model import build_model, count_parameters

REPO = Path(__file__).resolve().parent.parent


def matmul_ceiling(n=2048, reps=10) -> float:
    "Best-of fp32 matmul throughput in FLOP/s on an n x n product (the MFU denominator)."
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3): a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best


def _timed(f) -> float:
    t = time.perf_counter(); f(); return time.perf_counter() - t


def flops_per_token(model, cfg) -> float:
    "nanoGPT's estimate: 6 N (position embeddings excluded) + 12 L H Q T."
    n = count_parameters(model) - model.transformer.wpe.weight.numel() if hasattr(model, 'transformer') else count_parameters(model)
    L, H, T = cfg.model.layers, cfg.model.attention_heads, cfg.data.max_sequence_length
    Q = cfg.model.embedding_size // H
    return 6 * n + 12 * L * H * Q * T


def plain_step(model, opt, sched, blocks, start, bs, max_norm):
    "One step of a plain PyTorch loop over the same batch; its seconds and loss."
    t = time.perf_counter()
    x, y = blocks.batch(start, bs)
    logits = model(input_ids=x, use_cache=False).logits
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    l = loss.item()
    return time.perf_counter() - t, l


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default=str(REPO/'configs'/'shakespeare-char.yaml'))
    p.add_argument('--corpus', default=str(REPO/'data'/'tinyshakespeare'/'input.txt'))
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--steps', type=int, default=40, help='steps per loop per round')
    p.add_argument('--compile', action='store_true', help="ours with training.compile (inductor): the plain loop stays eager")
    p.add_argument('--set', action='append', default=[], help='config overrides for both loops')
    p.add_argument('--attention', help="ours with this training.attention (the plain loop keeps transformers' default, sdpa)")
    a = p.parse_args(argv)

    cfg = load_config(a.config, [f'data.source_corpus={a.corpus}', *a.set])
    prep = prepare(cfg.data, cfg.tokenizer, progress=False)
    cfg = resolve_config(cfg, len(TokenBlocks(prep.train, cfg.data.max_sequence_length)), prep.vocab_size)
    t = cfg.training
    bs, T = cfg.data.batch_size, cfg.data.max_sequence_length
    dls = DataLoaders.from_config(prep, cfg.data, cfg.random_seed, t.eval_batches)

    m1 = build_model(cfg.model, prep.vocab_size, T, prep.tokenizer.eos_token_id, seed=cfg.random_seed)
    m2 = copy.deepcopy(m1)
    if a.attention: set_attention(m1, a.attention)
    o1, o2 = make_optimizer(m1, t), make_optimizer(m2, t)
    s1, s2 = make_scheduler(o1, t), make_scheduler(o2, t)
    tmp = Path(tempfile.mkdtemp())
    lean, why = lean_forward(m1) if t.lean_forward else (None, 'training.lean_forward is off')
    learn = Learner(m1, dls, o1, s1, train_steps=t.train_steps, max_grad_norm=t.max_grad_norm,
                    cbs=[MetricsLogger(tmp/'metrics.jsonl', t.log_interval), ProgressBar(disable=True)],
                    forward=compile_for_training(lean or m1, t.compile_backend, t.compile_mode) if a.compile else lean)
    print(f"ours: {'the lean GPT-2 forward' if lean else 'the model forward (' + why + ')'}{', compiled' if a.compile else ''}; "
          "the plain loop: the model's forward (transformers)", flush=True)

    learn('before_fit')  # fit() runs in rounds here, so fire its opening event once by hand
    ours, plain, ratios, diffs = [], [], [], []
    learn.train_steps = 10**9  # never the last step: no end-of-run evaluation inside the timing
    m2.train()
    for r in range(a.rounds + 1):  # the loops alternate step by step: each pair of steps sees the same machine
        to, tp = [], []
        for i in range(a.steps):  # our step timed from outside, callbacks included
            t0 = time.perf_counter(); one_step(learn); to.append(time.perf_counter() - t0)
            sec, loss = plain_step(m2, o2, s2, dls.train, (r * a.steps + i) * bs, bs, t.max_grad_norm); tp.append(sec)
            diffs.append(abs(learn.state.loss - loss))
        if r == 0: continue  # warm-up round
        ours += to; plain += tp; ratios += [p / o for o, p in zip(to, tp)]
        print(f'round {r}: ours {statistics.median(to)*1000:.1f} ms/step, plain {statistics.median(tp)*1000:.1f} ms/step, '
              f'median ratio of paired steps {statistics.median([p / o for o, p in zip(to, tp)]):.3f}', flush=True)

    tok = bs * T
    ours_s, plain_s = statistics.median(ours), statistics.median(plain)
    ceiling = matmul_ceiling()
    fpt = flops_per_token(m1, cfg)
    print(f'model: {count_parameters(m1):,} parameters, {fpt/1e6:.2f} MFLOP/token; batch {bs} x {T} tokens; torch threads {torch.get_num_threads()}')
    print(f'fp32 matmul ceiling: {ceiling/1e9:.1f} GFLOP/s')
    print(f'ours : {ours_s*1000:.1f} ms/step, {tok/ours_s:,.0f} tokens/s, MFU {fpt*tok/ours_s/ceiling:.1%}')
    print(f'plain: {plain_s*1000:.1f} ms/step, {tok/plain_s:,.0f} tokens/s, MFU {fpt*tok/plain_s/ceiling:.1%}')
    how = f' (ours compiled: {t.compile_backend}, mode {t.compile_mode or "default"})' if a.compile else ''
    print(f'ours vs plain: {statistics.median(ratios):.2f}x the plain loop\'s speed (median over {len(ratios)} paired steps){how}; '
          f'the same batches, losses within {max(diffs):.2g} of each other over {len(diffs)} steps')


if __name__ == '__main__':
    sys.exit(main())
