use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

pub fn read_lines(path: &Path) -> io::Result<Vec<String>> {
    let file = fs::File::open(path)?;
    BufReader::new(file).lines().collect()
}

pub fn count_lines(path: &Path) -> io::Result<usize> {
    Ok(read_lines(path)?.len())
}

pub fn rust_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rust_files(&path)?);
        } else if path.extension().map_or(false, |e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

pub fn copy_with_backup(from: &Path, to: &Path) -> io::Result<u64> {
    if to.exists() {
        let backup = to.with_extension("bak");
        fs::rename(to, &backup)?;
    }
    fs::copy(from, to)
}
