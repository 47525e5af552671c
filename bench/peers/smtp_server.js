// nodemailer's smtp-server as a peer: either discard every message, or parse it
// with mailparser and POST one JSON document to a webhook, replying 250 only
// after the webhook answered 2xx (the same promise mailbridge's sync mode makes).
//
// Usage: node smtp_server.js PORT discard
//        node smtp_server.js PORT post http://127.0.0.1:SINK/hook
'use strict';
const http = require('http');
const { SMTPServer } = require('smtp-server');
const { simpleParser } = require('mailparser');

const [port, mode, hook] = process.argv.slice(2);
const MAX_BYTES = 64 * 1024 * 1024;
const agent = new http.Agent({ keepAlive: true, maxSockets: 100 });
const target = hook ? new URL(hook) : null;

function post(body) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: target.hostname, port: target.port, path: target.pathname, method: 'POST', agent,
        headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        res.resume();
        res.on('end', () => (res.statusCode < 300 ? resolve() : reject(new Error(`HTTP ${res.statusCode}`))));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

function document(mail, session) {
  const from = mail.from && mail.from.value && mail.from.value[0];
  return JSON.stringify({
    sender: from ? from.address : session.envelope.mailFrom.address,
    sender_name: from ? from.name : '',
    recipient: session.envelope.rcptTo[0].address,
    recipients: session.envelope.rcptTo.map((r) => r.address),
    subject: mail.subject || '',
    body: mail.text || '',
    html_body: mail.html || null,
    message_id: mail.messageId || null,
    headers: {},
    attachments: (mail.attachments || []).map((a) => ({
      filename: a.filename || null, content_type: a.contentType, size_bytes: a.size,
      data: a.content.toString('base64'),
    })),
  });
}

function onData(stream, session, callback) {
  if (mode === 'discard') {
    stream.on('data', () => {});
    stream.on('end', () => callback(stream.sizeExceeded ? Object.assign(new Error('552 too big'), { responseCode: 552 }) : null));
    return;
  }
  simpleParser(stream)
    .then((mail) => post(document(mail, session)))
    .then(() => callback(), (err) => callback(Object.assign(new Error(`try again later (${err.message})`), { responseCode: 451 })));
}

const server = new SMTPServer({
  banner: `smtp-server ${mode}`, logger: false, authOptional: true, size: MAX_BYTES,
  disableReverseLookup: true, // no DNS here; mailbridge does no reverse lookup either
  disabledCommands: ['AUTH', 'STARTTLS'], onData,
});
server.listen(Number(port), '127.0.0.1');
process.on('SIGTERM', () => server.close(() => process.exit(0)));
