//! cmdline: the command line arrives whole: printable ASCII, NUL-terminated,
//! echoed back (`# cmdline: ...`, `# echo: <tk.echo>`) for the host to check.

use crate::tap::Msg;
use crate::{diag, fail, Ctx};

pub fn run(ctx: &Ctx) -> Result<(), Msg> {
    let boot = ctx.boot;
    diag!(
        "cmdline at {:#x}, {} bytes",
        boot.cmdline_addr,
        boot.cmdline_len
    );
    if let Some(e) = boot.cmdline_error {
        fail!("{}", e);
    }
    if let Some(i) = boot
        .cmdline_bytes()
        .iter()
        .position(|&b| !(0x20..0x7f).contains(&b))
    {
        fail!(
            "byte {} of the command line is not printable ASCII ({:#x})",
            i,
            boot.cmdline_bytes()[i]
        );
    }
    diag!("cmdline: {}", boot.cmdline());
    match ctx.arg("tk.echo") {
        Some("") => fail!("tk.echo is empty"),
        Some(token) => diag!("echo: {}", token),
        None => diag!("no tk.echo given"),
    }
    Ok(())
}
