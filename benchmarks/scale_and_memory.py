"""Past one process, side by side in one script: DDP throughput on N processes against one process on the same cores, and
peak memory with and without gradient checkpointing.

1. The same config (configs/shakespeare-char.yaml, a fixed number of steps) trained by `foundry train --nproc N` (N processes
   of `threads / N` threads each, gloo on CPU; nccl on N GPUs) and by `foundry train` (one process of `threads` threads);
   the two alternate for `--rounds` rounds and each reports the median tokens/s of its steady train records.
2. A deeper, longer-context model trained for a few steps with `training.gradient_checkpointing` off and on, each in its own
   process (peak RSS only grows within a process): peak RSS on CPU, peak allocated CUDA memory on a GPU, and the time per step.

    python benchmarks/scale_and_memory.py [--nproc 2] [--threads 2] [--rounds 2] [--steps 60] [--device auto]
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOUNDRY = Path(sys.executable).parent/'foundry'


def run(config, run_dir, sets, nproc=1, threads=1) -> list[dict]:
    "Train in a subprocess; its train records (the first one, which pays for warm-up, dropped)."
    args = [str(FOUNDRY), 'train', str(config), '--run-dir', str(run_dir), '--nproc', str(nproc), *[x for s in sets for x in ('--set', s)]]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    res = subprocess.run(args, capture_output=True, text=True, env=env)
    if res.returncode != 0: sys.exit(f'training failed:\n{res.stderr[-3000:]}')
    recs = [json.loads(l) for l in (Path(run_dir)/'metrics.jsonl').read_text().splitlines()]
    return [r for r in recs if r['type'] == 'train'][1:]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--nproc', type=int, default=2)
    p.add_argument('--threads', type=int, default=2, help='cores for each side: the N processes get threads/N each')
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--steps', type=int, default=60)
    p.add_argument('--device', default='auto', help='the device of the memory comparison')
    p.add_argument('--ddp-device', default='cpu', help='the device of the DDP comparison (cuda: one GPU per process)')
    p.add_argument('--only', choices=('ddp', 'memory'), help='run one of the two comparisons')
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='foundry-scale-'))
    os.environ.setdefault('FOUNDRY_CACHE', str(tmp/'cache'))
    config = REPO/'configs'/'shakespeare-char.yaml'
    base = [f'training.train_steps={a.steps}', f'training.eval_interval={a.steps}', 'training.eval_batches=2', 'training.log_interval=5',
            'logging.use_wandb=false']
    if a.only != 'memory': ddp(a, config, base + [f'training.device={a.ddp_device}'], tmp)
    if a.only != 'ddp': memory(a, config, base + [f'training.device={a.device}'], tmp)


def ddp(a, config, base, tmp):
    "N processes vs one, alternating rounds."
    tps, losses = {1: [], a.nproc: []}, {}
    for r in range(a.rounds):
        for n in (a.nproc, 1):
            recs = run(config, tmp/f'ddp-{n}-{r}', base, nproc=n, threads=max(1, a.threads // n) if n > 1 else a.threads)
            tps[n].append(statistics.median(x['tokens_per_s'] for x in recs))
            losses[n] = [x['loss'] for x in recs]
    one, many = statistics.median(tps[1]), statistics.median(tps[a.nproc])
    print(f'DDP on {a.ddp_device}: {a.nproc} processes x {max(1, a.threads // a.nproc)} thread(s) {many:,.0f} tokens/s vs 1 process x '
          f'{a.threads} threads {one:,.0f} tokens/s: ratio {many / one:.2f} (medians of {a.rounds} alternating rounds; the same '
          f'global batch; losses differ by at most {max(abs(x - y) for x, y in zip(losses[1], losses[a.nproc])):.2g})')



def memory(a, config, base, tmp):
    "Gradient checkpointing off vs on: peak memory and throughput."
    deep = base + ['model.layers=8', 'model.embedding_size=256',
                        'model.attention_heads=8', 'data.max_sequence_length=256', 'data.batch_size=32',
                        'training.train_steps=6', 'training.eval_interval=6', 'training.log_interval=1']
    out = {}
    for gc in ('false', 'true'):
        recs = run(config, tmp/f'gc-{gc}', deep + [f'training.gradient_checkpointing={gc}'], threads=a.threads)
        peak = max(r.get('gpu_peak_allocated_mb') or r['peak_ram_mb'] for r in recs)
        out[gc] = (peak, statistics.median(r['tokens_per_s'] for r in recs))
        what = 'peak CUDA allocated' if 'gpu_peak_allocated_mb' in recs[-1] else 'peak RSS'
        print(f'gradient checkpointing {gc:5}: {what} {peak:,.0f} MiB, {out[gc][1]:,.0f} tokens/s (8 x 256 model, 32 x 256 tokens per step)')
    print(f'gradient checkpointing: peak memory {out["true"][0] / out["false"][0]:.2f}x ({out["false"][0] - out["true"][0]:,.0f} MiB less; '
          f'RSS includes the process baseline), throughput {out["true"][1] / out["false"][1]:.2f}x')


if __name__ == '__main__':
    main()
