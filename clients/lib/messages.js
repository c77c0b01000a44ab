// The wire messages, server to client and client to server (docs/protocol.md).
// Field names, value sets and nullability are the protocol's, exactly.
export {};
