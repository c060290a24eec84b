//! Finds the `ffmpeg` and `ffprobe` executables once, so every video call runs the same binaries
//! and a missing install is reported as one clear error instead of a spawn failure per file.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::MediaError;

/// Environment variable naming the `ffmpeg` executable (overrides `PATH`).
pub const FFMPEG_ENV: &str = "QALIGN_FFMPEG";
/// Environment variable naming the `ffprobe` executable (overrides `PATH`).
pub const FFPROBE_ENV: &str = "QALIGN_FFPROBE";

/// Paths of the `ffmpeg` and `ffprobe` executables used for probing and decoding.
#[derive(Debug)]
pub struct FfmpegTools {
    ffmpeg: PathBuf,
    ffprobe: PathBuf,
    passthrough_flag: OnceLock<&'static str>,
}

impl Clone for FfmpegTools {
    fn clone(&self) -> Self {
        Self::new(self.ffmpeg.clone(), self.ffprobe.clone())
    }
}

impl FfmpegTools {
    /// Uses the given executables as they are (no lookup).
    pub fn new(ffmpeg: impl Into<PathBuf>, ffprobe: impl Into<PathBuf>) -> Self {
        Self {
            ffmpeg: ffmpeg.into(),
            ffprobe: ffprobe.into(),
            passthrough_flag: OnceLock::new(),
        }
    }

    /// The process-wide tools, located on first success from `$QALIGN_FFMPEG`, `$QALIGN_FFPROBE`
    /// and `$PATH` (see [`FfmpegTools::locate`]). A failed lookup is retried on the next call.
    pub fn shared() -> Result<&'static FfmpegTools, MediaError> {
        static SHARED: OnceLock<FfmpegTools> = OnceLock::new();
        if let Some(tools) = SHARED.get() {
            return Ok(tools);
        }
        let located = Self::locate(
            std::env::var_os(FFMPEG_ENV),
            std::env::var_os(FFPROBE_ENV),
            std::env::var_os("PATH"),
        )?;
        Ok(SHARED.get_or_init(|| located))
    }

    /// Locates both tools. An override variable that is set and non-empty must name an existing
    /// file. Without one, `ffprobe` is looked for next to an overridden `ffmpeg` first, then each
    /// tool in the directories of `path_var`.
    pub fn locate(
        ffmpeg_override: Option<OsString>,
        ffprobe_override: Option<OsString>,
        path_var: Option<OsString>,
    ) -> Result<Self, MediaError> {
        let ffmpeg = locate_one(
            "ffmpeg",
            FFMPEG_ENV,
            ffmpeg_override.as_deref(),
            None,
            path_var.as_deref(),
        )?;
        let sibling = ffmpeg_override
            .is_some()
            .then(|| ffmpeg.with_file_name("ffprobe"));
        let ffprobe = locate_one(
            "ffprobe",
            FFPROBE_ENV,
            ffprobe_override.as_deref(),
            sibling.as_deref(),
            path_var.as_deref(),
        )?;
        Ok(Self::new(ffmpeg, ffprobe))
    }

    /// The `ffmpeg` executable.
    pub fn ffmpeg(&self) -> &Path {
        &self.ffmpeg
    }

    /// The `ffprobe` executable.
    pub fn ffprobe(&self) -> &Path {
        &self.ffprobe
    }

    /// The option that keeps every decoded frame exactly once (no duplication or dropping to a
    /// constant rate): `-fps_mode` since FFmpeg 5.1, `-vsync` before (removed in later releases).
    pub(crate) fn passthrough_flag(&self) -> &'static str {
        self.passthrough_flag.get_or_init(|| {
            let knows_fps_mode = Command::new(&self.ffmpeg)
                .args([
                    "-hide_banner",
                    "-loglevel",
                    "quiet",
                    "-fps_mode",
                    "passthrough",
                    "-version",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if knows_fps_mode {
                "-fps_mode"
            } else {
                "-vsync"
            }
        })
    }
}

fn locate_one(
    tool: &'static str,
    env_var: &'static str,
    override_value: Option<&OsStr>,
    sibling: Option<&Path>,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, MediaError> {
    if let Some(value) = override_value.filter(|v| !v.is_empty()) {
        // A bare name ("ffmpeg-6") is searched in PATH like a shell would; a path is checked as is.
        return find_executable(value, path_var).ok_or_else(|| MediaError::ToolNotFound {
            tool,
            env_var,
            searched: format!(
                "${env_var} = {} is not an executable file",
                Path::new(value).display()
            ),
        });
    }
    if let Some(path) = sibling.and_then(|p| find_executable(p.as_os_str(), None)) {
        return Ok(path);
    }
    find_executable(OsStr::new(tool), path_var).ok_or_else(|| MediaError::ToolNotFound {
        tool,
        env_var,
        searched: "not in PATH".into(),
    })
}

/// `name` searched in `path_var` when it is a bare name, else checked as a path (relative ones
/// from the current directory); only executable regular files count.
fn find_executable(name: &OsStr, path_var: Option<&OsStr>) -> Option<PathBuf> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    which::which_in(name, path_var, cwd).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn fake_tool(dir: &Path, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn missing_tools_give_the_install_hint() {
        let empty = tempfile::tempdir().unwrap();
        let err = FfmpegTools::locate(None, None, Some(empty.path().into())).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "ffmpeg not found: install Debian's ffmpeg package or set QALIGN_FFMPEG"
            ),
            "{msg}"
        );
        let err = FfmpegTools::locate(None, None, None).unwrap_err();
        assert!(matches!(
            err,
            MediaError::ToolNotFound { tool: "ffmpeg", .. }
        ));
    }

    #[test]
    fn override_must_exist() {
        let err = FfmpegTools::locate(Some("/nonexistent/ffmpeg".into()), None, None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("QALIGN_FFMPEG") && msg.contains("/nonexistent/ffmpeg"),
            "{msg}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn path_search_and_sibling_lookup() {
        let bin = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let ffmpeg = fake_tool(bin.path(), "ffmpeg");
        let ffprobe = fake_tool(bin.path(), "ffprobe");
        // Non-executable files are skipped.
        std::fs::write(other.path().join("ffmpeg"), "").unwrap();
        let path_var = std::env::join_paths([other.path(), bin.path()]).unwrap();
        let tools = FfmpegTools::locate(None, None, Some(path_var)).unwrap();
        assert_eq!(tools.ffmpeg(), ffmpeg);
        assert_eq!(tools.ffprobe(), ffprobe);

        // ffprobe next to an overridden ffmpeg wins over PATH.
        let custom = tempfile::tempdir().unwrap();
        let custom_ffmpeg = fake_tool(custom.path(), "ffmpeg");
        let custom_ffprobe = fake_tool(custom.path(), "ffprobe");
        let tools = FfmpegTools::locate(
            Some(custom_ffmpeg.clone().into()),
            None,
            Some(bin.path().into()),
        )
        .unwrap();
        assert_eq!(tools.ffmpeg(), custom_ffmpeg);
        assert_eq!(tools.ffprobe(), custom_ffprobe);

        // An explicit ffprobe override wins over the sibling; an empty override is ignored.
        let tools = FfmpegTools::locate(
            Some(OsString::new()),
            Some(ffprobe.clone().into()),
            Some(bin.path().into()),
        )
        .unwrap();
        assert_eq!(tools.ffmpeg(), ffmpeg);
        assert_eq!(tools.ffprobe(), ffprobe);

        // A bare override name is looked up in PATH; a directory is not an executable.
        let renamed = fake_tool(custom.path(), "ffmpeg-6");
        let tools = FfmpegTools::locate(
            Some("ffmpeg-6".into()),
            Some(ffprobe.clone().into()),
            Some(custom.path().into()),
        )
        .unwrap();
        assert_eq!(tools.ffmpeg(), renamed);
        let err = FfmpegTools::locate(Some(bin.path().into()), None, None).unwrap_err();
        assert!(
            err.to_string().contains("is not an executable file"),
            "{err}"
        );
    }
}
