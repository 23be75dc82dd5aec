"""Write tests/fixtures/golden/<version>/: run directories written by this version of model_foundry, which every
later version must still resume (bit for bit where the format allows), evaluate and generate from.

    python tools/make_golden_fixture.py [--out tests/fixtures/golden]

<version> is model_foundry's version and the format versions it writes (e.g. 0.1.0-schema2-ckpt1-trainer2-state1).
Inside it:
  stopped/     a run of 20 steps stopped after its step-10 checkpoint, as a stop signal leaves it (status interrupted)
  completed/   the same run trained to the end in one go: final/ (safetensors), final-bin/ (the same model with its
               weights in pytorch_model.bin, as transformers 4 exported before safetensors), metrics.jsonl (the losses a
               resumed `stopped` reproduces); report/ left out
  FIXTURE.json what wrote it (versions, formats, torch and transformers, the command) and what this version said of
               `completed`: `foundry eval`'s validation numbers and a greedy generation, which later versions must repeat
An existing version's directory is never overwritten: a fixture is a promise to the versions after it.
"""
import argparse, json, os, platform, shutil, subprocess, sys, tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = """experiment_name: golden
random_seed: 0
data: {{source_corpus: {corpus}, batch_size: 8, max_sequence_length: 16}}
tokenizer: {{kind: char}}
model: {{layers: 1, embedding_size: 32, attention_heads: 2}}
training: {{train_steps: 20, learning_rate: 3.0e-3, warmup_steps: 5, eval_interval: 10, eval_batches: 2, checkpoint_interval: 10,
           log_interval: 5, precision: fp32}}
"""


PROMPT = 'th'


def fixture_name() -> str:
    "This version of model_foundry and the format versions it writes."
    import model_foundry
    from model_foundry.checkpointing import CHECKPOINT_FORMAT, FORMAT_VERSION
    from model_foundry.config import SCHEMA_VERSION
    from model_foundry.run import STATE_FORMAT
    return f'{model_foundry.__version__}-schema{SCHEMA_VERSION}-ckpt{CHECKPOINT_FORMAT}-trainer{FORMAT_VERSION}-state{STATE_FORMAT}'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=str(REPO/'tests'/'fixtures'/'golden'))
    a = p.parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    import torch, transformers
    torch.set_num_threads(1)  # the tests resume with one thread too: float sums in the same order
    from transformers import AutoModelForCausalLM
    from model_foundry.config import load_config
    from model_foundry.fixtures import StopAfter
    from model_foundry.generation import generate
    from model_foundry.results import evaluate_run, load_run
    from model_foundry.run import RunInterrupted, train
    out = Path(a.out)/fixture_name()
    if out.exists(): sys.exit(f'{out} exists: a fixture of this version is never rewritten (bump a format version or the package version)')
    work = Path(tempfile.mkdtemp())
    (work/'c.yaml').write_text(CONFIG.format(corpus=REPO/'tests'/'data'/'tiny.txt'))
    os.environ['FOUNDRY_CACHE'] = str(work/'cache')
    cfg = load_config(work/'c.yaml')
    try: train(cfg, work/'stopped', progress=False, callbacks=[StopAfter(10)])
    except RunInterrupted: pass
    assert json.loads((work/'stopped'/'state.json').read_text())['status'] == 'interrupted'
    assert train(cfg, work/'completed', progress=False)['status'] == 'completed'
    # final/ as transformers 4 exported it by default before safetensors: the weights in pytorch_model.bin (transformers 5
    # saves safetensors only, so the state dict is written with torch.save, as save_pretrained(safe_serialization=False) did)
    final, legacy = work/'completed'/'final', work/'completed'/'final-bin'
    shutil.copytree(final, legacy, ignore=shutil.ignore_patterns('*.safetensors'))
    torch.save(AutoModelForCausalLM.from_pretrained(final).state_dict(), legacy/'pytorch_model.bin')
    said = dict(validation=evaluate_run(work/'completed')['validation'], prompt=PROMPT,
                greedy=generate(*load_run(work/'completed'), PROMPT, 12, temperature=0).text)
    out.mkdir(parents=True)
    for name in ('stopped', 'completed'):
        shutil.copytree(work/name, out/name, ignore=shutil.ignore_patterns('report', 'trainer.lock', '*.ipynb'))
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()
    facts = dict(name=out.name, git_commit=commit, torch=torch.__version__, transformers=transformers.__version__,
                 python=platform.python_version(), threads=1, config=CONFIG.format(corpus='tests/data/tiny.txt'),
                 made_by='python tools/make_golden_fixture.py', **said)
    (out/'FIXTURE.json').write_text(json.dumps(facts, indent=1))
    print(f'{out}: {sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1024:.0f} KiB')


if __name__ == '__main__':
    sys.exit(main())
