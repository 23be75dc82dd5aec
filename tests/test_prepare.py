"""`foundry prepare` on real files: cached by content, undecodable files skipped and counted."""
import time

from conftest import foundry, foundry_here
from model_foundry.config import DataConfig, TokenizerConfig
from model_foundry.data import prepare


def test_second_prepare_is_served_from_cache_and_a_changed_file_is_not(tmp_path, cache_dir):
    corpus = tmp_path/'corpus'; corpus.mkdir()
    for i in range(5): (corpus/f'm{i}.py').write_text(f'def f{i}(x):\n    return x * {i}\n' * 200)
    (corpus/'blob.py').write_bytes(b'\x89PNG\r\n\x1a\n\xff\xd8 binary')
    dc, tc = DataConfig(source_corpus=str(corpus)), TokenizerConfig(kind='bpe', vocab_size=300)
    first = prepare(dc, tc, progress=False)
    assert first.meta['files'] == 5 and first.meta['skipped_files'] == [str(corpus/'blob.py')]
    t0 = time.perf_counter(); again = prepare(dc, tc, progress=False); cached_s = time.perf_counter() - t0
    assert again.path == first.path and cached_s < 1.0
    (corpus/'m0.py').write_text('print("changed")\n' * 300)
    assert prepare(dc, tc, progress=False).path != first.path


def test_prepare_command_reports_tokens_and_an_empty_corpus_is_an_error(tmp_path, cache_dir):
    (tmp_path/'empty').mkdir()
    (tmp_path/'empty'/'a.txt').write_text('')
    cfg = tmp_path/'c.yaml'
    cfg.write_text(f"data:\n  source_corpus: {tmp_path/'empty'}\ntokenizer:\n  kind: char\n")
    res = foundry_here('prepare', cfg)
    assert res.returncode == 2 and 'holds no readable text' in res.stderr and len(res.stderr.strip().splitlines()) == 1
    (tmp_path/'empty'/'b.txt').write_text('some words here\n' * 100)
    res = foundry_here('prepare', cfg)
    assert res.returncode == 0 and '1,600 tokens' in res.stdout, res.stdout + res.stderr
