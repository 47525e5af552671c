// npm mailin (SMTP -> webhook) as a peer, configured to do no DKIM, SPF or spam
// scoring (they need external tools) and to log only warnings. Note: mailin
// answers 250 as soon as the message is on its temp disk, before it posts.
//
// Usage: node mailin.js PORT http://127.0.0.1:SINK/hook TMPDIR
'use strict';
// mailin 3.0.4 bundles smtp-server 1.x, whose SMTPStream assigns `this.closed`;
// since Node 18 `Writable.prototype.closed` is a getter only, so that throws and
// mailin cannot take a connection. This shim (ours, not mailin's) gives the old
// class its own plain flag; nothing else of mailin is changed.
const { SMTPStream } = require('mailin/node_modules/smtp-server/lib/smtp-stream');
Object.defineProperty(SMTPStream.prototype, 'closed', {
  configurable: true,
  get() { return Boolean(this._legacyClosed); },
  set(value) { this._legacyClosed = value; },
});
const mailin = require('mailin');

const [port, hook, tmp] = process.argv.slice(2);
mailin.start({
  host: '127.0.0.1', port: Number(port), webhook: hook, tmp,
  disableDkim: true, disableSpf: true, disableSpamScore: true, disableDnsLookup: true,
  logLevel: 'warn',
  smtpOptions: {
    banner: 'mailin', logger: false, disabledCommands: ['AUTH', 'STARTTLS'], size: 64 * 1024 * 1024,
    disableReverseLookup: true, // no DNS here; mailbridge does no reverse lookup either
  },
});
process.on('SIGTERM', () => process.exit(0));
