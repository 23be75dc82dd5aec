use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;

/// Settings read from a `key = value` file.
#[derive(Debug, Default)]
pub struct Config {
    values: HashMap<String, String>,
}

#[derive(Debug)]
pub enum ConfigError {
    Io(io::Error),
    BadLine(usize, String),
}

impl From<io::Error> for ConfigError {
    fn from(e: io::Error) -> Self {
        ConfigError::Io(e)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path)?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut values = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once('=') {
                Some((key, value)) => {
                    values.insert(key.trim().to_string(), value.trim().to_string());
                }
                None => return Err(ConfigError::BadLine(number + 1, line.to_string())),
            }
        }
        Ok(Config { values })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|v| v.as_str())
    }

    pub fn get_or(&self, key: &str, default: &str) -> String {
        self.get(key).unwrap_or(default).to_string()
    }
}
