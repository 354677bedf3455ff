//! `pvmm-remote`: calls a running pvmm's API and prints its JSON answer.

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
        /// optionally `,id=NAME` and `,iommu=direct|pviommu`.
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
    let mut text = format!("Error: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(answer) => {
            if !answer.is_empty() {
                println!("{answer}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{}", report(&error));
            ExitCode::FAILURE
        }
    }
}
