// The TypeScript MCP SDK's own client and stdio transport, pointed at `warden mcp stdio`.
// Usage: node client.mjs <warden> <args...>; prints one JSON object with what it saw.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";

const [command, ...args] = process.argv.slice(2);
const transport = new StdioClientTransport({ command, args, stderr: "inherit" });
const client = new Client({ name: "warden-js-test", version: "1.0.0" });
const text = (r) => (r.content || []).map((c) => c.text || "").join("");
const out = {};
await client.connect(transport);
out.tools = (await client.listTools()).tools.map((t) => t.name).sort();
const weather = await client.callTool({ name: "get_weather", arguments: { location: "Kyoto" } });
out.weather = { text: text(weather), isError: !!weather.isError };
const denied = await client.callTool({ name: "delete_all", arguments: {} });
out.denied = { text: text(denied), isError: !!denied.isError };
const bad = await client.callTool({ name: "add", arguments: { a: 1000, b: 1 } });
out.bad = { text: text(bad), isError: !!bad.isError };
try {
  await client.readResource({ uri: "docs://secret/keys" });
  out.resource = "read";
} catch (e) {
  out.resource = String(e.message || e);
}
await client.close();
console.log(JSON.stringify(out));
