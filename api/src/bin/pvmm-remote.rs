//! `pvmm-remote`: calls a running pvmm's API and prints its JSON answer.
//!
//! A reader that goes away before the answer is printed (`pvmm-remote info |
//! head -1`) is no error: the request has been carried out, so pvmm-remote
//! exits quietly with status 0, as it does for `--help | head -1`. Nothing
//! it prints can panic: other write errors on stdout are reported on stderr
//! (status 1), and write errors on stderr itself are ignored.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use api::actions::{
    IommuDomains, VmAddDevice, VmInfo, VmRemoveDevice, VmShutdown, VmmPing, VmmShutdown,
};
use api::client::{parse_device_spec, Client, ClientError};
use api::{AddDeviceRequest, ApiAction, DeviceId, NoBody, RemoveDeviceRequest};
use clap::{Parser, Subcommand};

/// Talk to a running pvmm through its API socket.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The socket given to `pvmm --api-socket`.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The VMM's version and pid (GET vmm.ping).
    Ping,
    /// The VM's configuration, state and devices (GET vm.info).
    Info,
    /// Hot-add a device (PUT vm.add-device).
    AddDevice {
        /// `kind=dma-test` or `path=/sys/bus/pci/devices/SSSS:BB:DD.F`, then
        /// optionally `,id=NAME`, `,iommu=direct|pviommu` and
        /// `,bus=root|vpci` (default: the VM's).
        #[arg(value_name = "SPEC", value_parser = parse_device_spec)]
        device: AddDeviceRequest,
    },
    /// Hot-remove a device (PUT vm.remove-device).
    RemoveDevice {
        #[arg(value_name = "ID")]
        id: DeviceId,
    },
    /// The pvIOMMU's domains and faults (GET iommu.domains).
    Domains,
    /// Stop the VM; the VMM keeps running (PUT vm.shutdown).
    ShutdownVm,
    /// Stop the VMM (PUT vmm.shutdown).
    ShutdownVmm,
}

/// Calls `A` and returns its answer as pretty JSON (empty for 204 routes).
async fn call<A: ApiAction>(client: &Client, body: A::Body) -> Result<String, ClientError> {
    let reply = client.call::<A>(&body).await?;
    let value = serde_json::to_value(reply).map_err(ClientError::Encode)?;
    if value.is_null() {
        return Ok(String::new());
    }
    serde_json::to_string_pretty(&value).map_err(ClientError::Encode)
}

async fn run(cli: Cli) -> Result<String, ClientError> {
    let client = Client::new(cli.api_socket);
    match cli.command {
        Command::Ping => call::<VmmPing>(&client, NoBody {}).await,
        Command::Info => call::<VmInfo>(&client, NoBody {}).await,
        Command::AddDevice { device } => call::<VmAddDevice>(&client, device).await,
        Command::RemoveDevice { id } => {
            call::<VmRemoveDevice>(&client, RemoveDeviceRequest { id }).await
        }
        Command::Domains => call::<IommuDomains>(&client, NoBody {}).await,
        Command::ShutdownVm => call::<VmShutdown>(&client, NoBody {}).await,
        Command::ShutdownVmm => call::<VmmShutdown>(&client, NoBody {}).await,
    }
}

/// The error and its causes, one per line.
fn report(error: &ClientError) -> String {
    format!("Error: {:#}", resources::ErrorChain(error))
}

/// Writes `text` and a newline to stderr; if stderr is gone there is no one
/// to tell, so errors are ignored (`eprintln!` would panic).
fn tell(text: &str) {
    let mut stderr = io::stderr().lock();
    let _ = writeln!(stderr, "{text}");
}

/// Writes the answer and a newline to stdout (`println!` would panic if
/// stdout is closed).
fn print_answer(answer: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{answer}")?;
    stdout.flush()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tell(&format!("Error: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(answer) if answer.is_empty() => ExitCode::SUCCESS,
        Ok(answer) => match print_answer(&answer) {
            Ok(()) => ExitCode::SUCCESS,
            // The reader has gone away (`| head`): it read what it wanted.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                tell(&format!(
                    "Error: the request was carried out, but its answer cannot be written \
                     to stdout: {e}; check where stdout goes"
                ));
                ExitCode::FAILURE
            }
        },
        Err(error) => {
            tell(&report(&error));
            ExitCode::FAILURE
        }
    }
}
