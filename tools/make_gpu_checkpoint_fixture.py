"""Write tests/fixtures/gpu_run: a tiny run stopped at step 10, its checkpoint written by a run on a CUDA device.

    python tools/make_gpu_checkpoint_fixture.py [--out tests/fixtures/gpu_run]

With CUDA, the run trains on the GPU for real (fp32) and its optimizer state is saved from there. Without
CUDA (how the committed fixture was made: no GPU was lent to that session), the run trains on the CPU and
its optimizer state is saved with torch's 'cuda:0' location tag on every tensor, which is exactly what
torch.save records for CUDA tensors: such a file fails to load on a CPU-only machine without map_location,
as a real GPU checkpoint does. environment.json in the fixture says which way it was made.
"""
import argparse, json, os, shutil, sys, tempfile
from pathlib import Path

import torch
from torch import serialization

REPO = Path(__file__).resolve().parent.parent
CONFIG = """experiment_name: gpu-run
random_seed: 0
data: {{source_corpus: {corpus}, batch_size: 8, max_sequence_length: 16}}
tokenizer: {{kind: char}}
model: {{layers: 1, embedding_size: 32, attention_heads: 2}}
training: {{train_steps: 20, learning_rate: 3.0e-3, warmup_steps: 5, eval_interval: 10, eval_batches: 2, checkpoint_interval: 10,
           log_interval: 5, precision: fp32}}
"""


def save_as_cuda(obj, path):
    "torch.save with every tensor's storage tagged 'cuda:0', as torch tags tensors that live on the first GPU."
    tag = lambda storage: 'cuda:0'
    serialization.register_package(0, tag, lambda storage, location: None)  # asked before the CPU tagger (priority 10)
    try: torch.save(obj, path)
    finally: serialization._package_registry[:] = [p for p in serialization._package_registry if p[1] is not tag]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=str(REPO/'tests'/'fixtures'/'gpu_run'))
    a = p.parse_args(argv)
    from model_foundry.checkpointing import write_manifest
    from model_foundry.config import load_config
    from model_foundry.fixtures import StopAfter
    from model_foundry.run import RunInterrupted, train
    work = Path(tempfile.mkdtemp())
    (work/'c.yaml').write_text(CONFIG.format(corpus=REPO/'tests'/'data'/'tiny.txt'))
    os.environ['FOUNDRY_CACHE'] = str(work/'cache')
    try: train(load_config(work/'c.yaml'), work/'run', progress=False, callbacks=[StopAfter(10)])
    except RunInterrupted: pass
    ck = work/'run'/'checkpoints'/'step-00000010'
    if not torch.cuda.is_available():
        save_as_cuda(torch.load(ck/'optimizer.pt', weights_only=True), ck/'optimizer.pt')
        write_manifest(ck)
    env = json.loads((work/'run'/'environment.json').read_text())
    env['fixture'] = 'trained on CUDA' if torch.cuda.is_available() else "trained on CPU; optimizer.pt saved with torch's 'cuda:0' tags"
    (work/'run'/'environment.json').write_text(json.dumps(env, indent=1))
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(work/'run', out, ignore=shutil.ignore_patterns('final', 'report'))
    print(f"{out}: {env['fixture']}")


if __name__ == '__main__':
    sys.exit(main())
