//! The pvmm virtual machine monitor: KVM VM, vCPUs, boot, ACPI, CLI.
