//! Writes plumb's man pages and shell completions into a directory:
//! `cargo run --example gen-docs -- OUT_DIR` (`make docs` uses `target/docs`). An example rather than
//! a binary, so packages that install the binaries do not install this too.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out_dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: gen-docs OUT_DIR");
        return ExitCode::from(2);
    };
    let out_dir = PathBuf::from(out_dir);
    match plumb::docs::write_docs(&out_dir) {
        Ok(()) => {
            println!(
                "wrote {}/man and {}/completions",
                out_dir.display(),
                out_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-docs: {e}");
            ExitCode::FAILURE
        }
    }
}
