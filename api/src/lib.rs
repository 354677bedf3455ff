//! REST API of the VMM on a Unix socket, its types and a client.
