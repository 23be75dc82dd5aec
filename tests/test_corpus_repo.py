"""Reading real git repositories: one written by the `git` command line, one by `make_repo` and its bare clone.
Commits are counted once across branches, trees read alike bare or not, history becomes CommitPackFT-shaped records."""
import os, subprocess

import pytest

from model_foundry.config import ConfigError
from model_foundry.repo import (T0, all_commits, analyse, analysis_table, branch_counts, commit_records, commit_text, make_repo,
                                open_repo, tree_files)

DAY = 86400


def git(cwd, *args, t=T0, who=('Ada Lovelace', 'ada@example.com')) -> str:
    "Run the real `git` in `cwd` with fixed author/committer dates and identity, no user or system config; its stdout."
    env = dict(os.environ, GIT_AUTHOR_DATE=f'@{t} +0000', GIT_COMMITTER_DATE=f'@{t} +0000', GIT_CONFIG_NOSYSTEM='1',
               GIT_CONFIG_GLOBAL=os.devnull, HOME=str(cwd))
    cmd = ['git', '-c', f'user.name={who[0]}', '-c', f'user.email={who[1]}', '-c', 'init.defaultBranch=main',
           '-c', 'commit.gpgsign=false']
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def commit(cwd, files: dict, msg: str, t: int, **kw):
    for p, text in files.items():
        (cwd/p).parent.mkdir(parents=True, exist_ok=True)
        (cwd/p).write_text(text)
    git(cwd, 'add', '-A', t=t)
    git(cwd, 'commit', '-q', '-m', msg, t=t, **kw)


def test_repository_analysis_counts_commits_on_all_branches_once(tmp_path):
    w = tmp_path/'shop'; w.mkdir()
    git(w, 'init', '-q')
    commit(w, {'app.py': 'def total(xs):\n    return sum(xs)\n', 'README.md': '# shop\n'}, 'Add the app', T0)
    commit(w, {'tests/test_app.py': 'from app import total\n'}, 'Add a test', T0 + 3600)
    git(w, 'branch', 'feat'); git(w, 'branch', 'fix')
    git(w, 'checkout', '-q', 'feat')
    commit(w, {'lib.rs': 'pub fn one() -> u8 { 1 }\n'}, 'Add a Rust lib', T0 + DAY, who=('Grace Hopper', 'grace@example.com'))
    git(w, 'checkout', '-q', 'fix')
    commit(w, {'app.py': 'def total(xs):\n    return sum(xs, 0)\n'}, 'Start the sum at 0', T0 + 2 * DAY)
    commit(w, {'Makefile': 'test:\n\tpytest\n'}, 'Add a Makefile', T0 + 2 * DAY + 60)
    git(w, 'checkout', '-q', 'main')
    (w/'README.md').write_text('# shop\n\nA tiny shop.\n')
    os.symlink('app.py', w/'link.py')                                           # a symbolic link and a submodule: not files
    git(w, 'add', '-A')
    git(w, 'update-index', '--add', '--cacheinfo', f"160000,{git(w, 'rev-parse', 'HEAD').strip()},vendor/sub")
    git(w, 'commit', '-q', '-m', 'Describe the shop', t=T0 + 3 * DAY)

    repo = open_repo(w)
    cs = all_commits(repo)
    assert sorted(str(c.id) for c in cs) == sorted(git(w, 'rev-list', '--all').split())   # pygit2 reads what git wrote, each once
    assert len(cs) == 6 and [c.commit_time for c in cs] == sorted(c.commit_time for c in cs)
    by_git = {b: int(git(w, 'rev-list', '--count', b)) for b in ('feat', 'fix', 'main')}
    assert branch_counts(repo) == by_git == {'feat': 3, 'fix': 4, 'main': 3}
    files = tree_files(repo)
    assert {'link.py', 'vendor/sub'} < set(git(w, 'ls-tree', '-r', '--name-only', 'HEAD').split())
    assert [f.path for f in files] == ['README.md', 'app.py', 'tests/test_app.py']
    last = [(r['subject'], r['new_file']) for r in commit_records(repo)][-1:]
    assert last == [('Describe the shop', 'README.md')]                        # no link, no submodule
    a = analyse(repo, files)
    assert (a['commits'], a['authors'], a['active_days'], a['commits_per_active_day']) == (6, 2, 4, 1.5)
    assert a['branches'] == {'feat': 3, 'fix': 4, 'main': 3} and a['top_authors'] == [['Ada Lovelace', 5], ['Grace Hopper', 1]]
    assert a['languages'] == {'Markdown': {'files': 1, 'bytes': 21}, 'Python': {'files': 2, 'bytes': 56}}
    assert a['head'] == git(w, 'rev-parse', 'HEAD').strip() and a['last_commit'] == '2023-11-17T22:13:20Z'
    assert analyse(repo, files) == a and 'ada@example.com' not in analysis_table(a)
    only_fix = analyse(repo, tree_files(repo, 'fix'), ['fix'])
    assert (only_fix['commits'], only_fix['branches']) == (4, {'fix': 4})
    assert sorted(only_fix['languages']) == ['Makefile', 'Markdown', 'Python']


HISTORY = [dict(files={'app.py': 'print(1)\n', 'notes.txt': 'todo\n'}, message='Start', time=T0),
           dict(files={'lib/util.py': 'def f():\n    pass\n'}, branch='dev', message='Add util', time=T0 + DAY),
           dict(files={'app.py': 'print(2)\n'}, message='Print two', time=T0 + 2 * DAY)]


def test_bare_repository_reads_like_a_working_tree_one(tmp_path):
    make_repo(tmp_path/'src'/'proj', HISTORY)
    (tmp_path/'clones').mkdir()
    git(tmp_path/'clones', 'clone', '-q', '--bare', str(tmp_path/'src'/'proj'), 'proj.git')
    work, bare = open_repo(tmp_path/'src'/'proj'), open_repo(tmp_path/'clones'/'proj.git')
    assert bare.is_bare and not work.is_bare
    assert tree_files(bare) == tree_files(work) and [f.repo for f in tree_files(bare)] == ['proj', 'proj']
    assert tree_files(bare, 'dev') == tree_files(work, 'dev') and len(tree_files(bare, 'dev')) == 3
    assert analyse(bare, tree_files(bare)) == analyse(work, tree_files(work))
    assert branch_counts(bare) == {'dev': 2, 'main': 2}
    assert list(commit_records(bare)) == list(commit_records(work))
    with pytest.raises(ConfigError, match="proj: no commit at ref 'nope' \\(branches: dev, main\\)"): tree_files(bare, 'nope')


def test_commits_have_commitpack_fields(tmp_path):
    big = 'x = 1\n' * 400                                                     # 2,400 bytes: over the limit below
    repo = make_repo(tmp_path/'r', [
        dict(files={'a.py': 'def a():\n    return 1\n', 'b.md': '# b\n', 'img.bin': b'\x00\x01\x02png', 'latin.txt': b'caf\xe9\n',
                    'big.py': big, 'old/name.go': 'package main\n\nfunc main() {}\n'}, message='Initial import\n\nSigned-off-by: Ada'),
        dict(files={'a.py': 'def a():\n    return 42\n', 'b.md': None}, message='Answer 42, drop b'),
        dict(files={'old/name.go': None, 'new/name.go': 'package main\n\nfunc main() {}\n'}, message='Move the Go file'),
        dict(files={'c.sh': 'echo c\n'}, branch='side', message='Add c'),
        dict(files={'d.sh': 'echo d\n'}, message='Add d'),
        dict(merge='side', message='Merge side')])
    recs = list(commit_records(repo, max_file_bytes=1000))
    assert all(set(r) == {'commit', 'parents', 'repo', 'subject', 'message', 'author', 'date', 'old_file', 'new_file', 'status',
                          'old_contents', 'new_contents', 'diff', 'lang'} for r in recs)
    got = [(r['subject'], r['status'], r['old_file'], r['new_file'], r['lang']) for r in recs]
    assert got == [('Initial import', 'added', '', 'a.py', 'Python'), ('Initial import', 'added', '', 'b.md', 'Markdown'),
                   ('Initial import', 'added', '', 'old/name.go', 'Go'),          # img.bin binary, latin.txt not UTF-8, big.py too big
                   ('Answer 42, drop b', 'modified', 'a.py', 'a.py', 'Python'), ('Answer 42, drop b', 'deleted', 'b.md', '', 'Markdown'),
                   ('Move the Go file', 'renamed', 'old/name.go', 'new/name.go', 'Go'), ('Add c', 'added', '', 'c.sh', 'Shell'),
                   ('Add d', 'added', '', 'd.sh', 'Shell')]                       # the merge is skipped
    mod, dele, ren = recs[3], recs[4], recs[5]
    assert (mod['old_contents'], mod['new_contents']) == ('def a():\n    return 1\n', 'def a():\n    return 42\n')
    assert '-    return 1\n' in mod['diff'] and '+    return 42\n' in mod['diff'] and mod['diff'].startswith('diff --git a/a.py b/a.py')
    assert (dele['old_contents'], dele['new_contents']) == ('# b\n', '') and '-# b' in dele['diff']
    assert ren['old_contents'] == ren['new_contents'] and 'rename from old/name.go' in ren['diff']
    assert recs[0]['parents'] == [] and mod['parents'] == [recs[0]['commit']]
    assert recs[0]['message'] == 'Initial import\n\nSigned-off-by: Ada'
    assert (mod['author'], mod['date'], mod['repo']) == ('Ada Lovelace', '2023-11-15T22:13:20Z', 'r')
    assert 'ada@example.com' not in repr(recs)
    assert [r['new_file'] for r in commit_records(repo)][:4] == ['a.py', 'b.md', 'big.py', 'old/name.go']  # the default limit keeps big.py
    with_merges = list(commit_records(repo, merges=True, max_file_bytes=1000))
    merge = with_merges[-1]
    assert len(with_merges) == len(recs) + 1 and (merge['subject'], merge['new_file'], len(merge['parents'])) == ('Merge side', 'c.sh', 2)
    assert commit_text(mod) == ('<commit_before>\ndef a():\n    return 1\n\n<commit_msg>\nAnswer 42, drop b\n'
                                '<commit_after>\ndef a():\n    return 42\n')
    side = [r['subject'] for r in commit_records(repo, branches=['side'], max_file_bytes=1000)]
    assert side == ['Initial import'] * 3 + ['Answer 42, drop b'] * 2 + ['Move the Go file', 'Add c']


def test_not_a_repository_raises_one_line_config_error(tmp_path):
    (tmp_path/'plain').mkdir()
    (tmp_path/'plain'/'x.py').write_text('x = 1\n')
    for p in (tmp_path/'plain', tmp_path/'missing', tmp_path/'plain'/'x.py'):
        with pytest.raises(ConfigError) as e: open_repo(p)
        assert str(e.value) == f'{p}: not a git repository'
    git(tmp_path, 'init', '-q', 'fresh')
    with pytest.raises(ConfigError) as e: open_repo(tmp_path/'fresh')
    assert str(e.value) == f"{tmp_path/'fresh'}: the repository has no commits" and '\n' not in str(e.value)
    repo = make_repo(tmp_path/'r', HISTORY)
    with pytest.raises(ConfigError, match="r: no branch 'nope' \\(branches: dev, main\\)"): all_commits(repo, ['nope'])
