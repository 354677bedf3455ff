//! COM1 (16550 at I/O port 0x3f8): the kernel's only output.
//!
//! Every port access is a VM exit, so the transmitter is polled once per
//! burst of up to 16 bytes (the FIFO depth) rather than once per byte.
//! The kernel prints from ring 3 too: [`Console`] gathers a line and sends
//! it from ring 0 in one go.

use crate::ring::ring0;
use crate::x86::{inb, outb};
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1;
const IER: u16 = COM1 + 1;
const FCR: u16 = COM1 + 2;
const LCR: u16 = COM1 + 3;
const MCR: u16 = COM1 + 4;
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 1 << 5;
const FIFO_DEPTH: usize = 16;
/// Polls of LSR before writing anyway (a missing UART reads 0xff or 0).
const MAX_POLLS: u32 = 100_000;

static LOCK: AtomicBool = AtomicBool::new(false);

/// Programs COM1 for 115200 8N1 with FIFOs on.
pub fn init() {
    outb(IER, 0x00);
    outb(LCR, 0x80); // DLAB
    outb(THR, 0x01); // divisor low: 115200 baud
    outb(IER, 0x00); // divisor high
    outb(LCR, 0x03); // 8N1
    outb(FCR, 0x07); // enable and clear FIFOs
    outb(MCR, 0x03); // DTR | RTS
}

fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(FIFO_DEPTH) {
        let mut polls = 0;
        while inb(LSR) & LSR_THRE == 0 && polls < MAX_POLLS {
            polls += 1;
            core::hint::spin_loop();
        }
        for &b in chunk {
            outb(THR, b);
        }
    }
}

/// The console as a `fmt::Write` sink; take it with [`Console::lock`].
/// Output is gathered into lines and sent when a line ends, the buffer is
/// full or the console is dropped: from ring 3 each send is one call into
/// ring 0.
pub struct Console {
    buf: [u8; 160],
    len: usize,
}

impl Console {
    const fn new() -> Console {
        Console {
            buf: [0; 160],
            len: 0,
        }
    }

    /// Takes the console lock (a spinlock; output from other CPUs waits).
    pub fn lock() -> Console {
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        Console::new()
    }

    /// Takes the console even if another CPU holds it (for the panic path).
    pub fn force() -> Console {
        LOCK.store(true, Ordering::Release);
        Console::new()
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn flush(&mut self) {
        if self.len != 0 {
            let bytes = &self.buf[..self.len];
            ring0(|| write_bytes(bytes));
            self.len = 0;
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
        LOCK.store(false, Ordering::Release);
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Serial terminals want CR LF.
        let mut rest = s.as_bytes();
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            self.push(&rest[..pos]);
            self.push(b"\r\n");
            self.flush();
            rest = &rest[pos + 1..];
        }
        self.push(rest);
        Ok(())
    }
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::console::Console::lock(), $($arg)*);
    }};
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut c = $crate::console::Console::lock();
        let _ = write!(c, $($arg)*);
        let _ = c.write_str("\n");
    }};
}
