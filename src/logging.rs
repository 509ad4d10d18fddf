//! Log setup shared by the binaries: three levels, to standard error or a file.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;

use simplelog::{ColorChoice, ConfigBuilder, LevelFilter, TermLogger, TerminalMode, WriteLogger};

/// The three levels the command lines accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors, warnings and notable events.
    Info,
    /// Everything, including per-connection events.
    Debug,
}

impl LogLevel {
    /// Parse `error|info|debug` or `0|1|2`.
    pub fn parse(text: &str) -> Result<LogLevel, String> {
        match text.to_ascii_lowercase().as_str() {
            "error" | "0" => Ok(LogLevel::Error),
            "info" | "1" => Ok(LogLevel::Info),
            "debug" | "2" => Ok(LogLevel::Debug),
            _ => Err(format!(
                "unknown log level '{text}': use error, info or debug (or 0, 1, 2)"
            )),
        }
    }

    fn filter(self) -> LevelFilter {
        match self {
            LogLevel::Error => LevelFilter::Error,
            LogLevel::Info => LevelFilter::Info,
            LogLevel::Debug => LevelFilter::Debug,
        }
    }
}

/// Why logging could not be set up.
#[derive(Debug)]
pub struct LogError(String);

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LogError {}

/// Install the global logger.
pub fn init(level: LogLevel, logfile: Option<&Path>) -> Result<(), LogError> {
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .build();
    let result = match logfile {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| LogError(format!("cannot open log file {}: {e}", path.display())))?;
            WriteLogger::init(level.filter(), config, file)
        }
        None => TermLogger::init(
            level.filter(),
            config,
            TerminalMode::Stderr,
            ColorChoice::Never,
        ),
    };
    result.map_err(|e| LogError(format!("cannot install logger: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_by_name_and_number() {
        assert_eq!(LogLevel::parse("error"), Ok(LogLevel::Error));
        assert_eq!(LogLevel::parse("0"), Ok(LogLevel::Error));
        assert_eq!(LogLevel::parse("INFO"), Ok(LogLevel::Info));
        assert_eq!(LogLevel::parse("1"), Ok(LogLevel::Info));
        assert_eq!(LogLevel::parse("debug"), Ok(LogLevel::Debug));
        assert_eq!(LogLevel::parse("2"), Ok(LogLevel::Debug));
        assert!(LogLevel::parse("verbose").unwrap_err().contains("error, info or debug"));
    }
}
