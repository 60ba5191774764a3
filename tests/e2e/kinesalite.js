// Starts kinesalite in memory on 127.0.0.1 only (its command line binds every interface).
//   node tests/e2e/kinesalite.js PORT
// Prints "ready" once it listens.
'use strict';
const kinesalite = require('kinesalite');

const port = Number(process.argv[2] || 4567);
const server = kinesalite({ createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 50 });
server.listen(port, '127.0.0.1', (err) => {
  if (err) { console.error(err); process.exit(1); }
  console.log('ready');
});
