// A third-party Fluent Forward receiver for the tests: the Fluent project's own Node package
// (@fluent-org/logger FluentServer). Appends every entry it receives to OUT as a JSON line.
// Usage: node fluent_server.js PORT OUT [--tls CERT KEY] [--shared-key KEY]
"use strict";
const fs = require("fs");
const { FluentServer } = require("@fluent-org/logger");

const [port, out, ...rest] = process.argv.slice(2);
const options = { listenOptions: { host: "127.0.0.1", port: Number(port) } };
for (let i = 0; i < rest.length; i++) {
  if (rest[i] === "--tls") {
    options.tlsOptions = { cert: fs.readFileSync(rest[i + 1]), key: fs.readFileSync(rest[i + 2]) };
    i += 2;
  } else if (rest[i] === "--shared-key") {
    options.security = { serverHostname: "fluent-test-server", sharedKey: rest[i + 1], authorize: false, userDict: {} };
    i += 1;
  }
}
const server = new FluentServer(options);
server.on("entry", (tag, time, record) => {
  fs.appendFileSync(out, JSON.stringify({ tag, time: time.toString(), record }) + "\n");
});
server.listen().then(() => console.log(`listening ${server.port}`));
