// Drives the official Node aggregation module for tests/cross_compat.rs.
//
//   node_compat.js aggregate    JSON lines of user records on stdin -> JSON lines of Kinesis records
//   node_compat.js deaggregate  a Lambda Kinesis event on stdin     -> JSON lines of user records
//   node_compat.js hashkey      JSON lines of user records on stdin -> JSON lines {"hashKey"}
//
// User records: {"partitionKey", "explicitHashKey" (or null), "data" (base64)}.
'use strict';
const agg = require('aws-kinesis-agg');

const input = require('fs').readFileSync(0, 'utf8');
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

function aggregate() {
  const records = input.split('\n').filter((l) => l.trim()).map((l) => {
    const u = JSON.parse(l);
    const r = { partitionKey: u.partitionKey, data: Buffer.from(u.data, 'base64') };
    if (u.explicitHashKey) r.explicitHashKey = u.explicitHashKey;
    return r;
  });
  agg.aggregate(records, (encoded, done) => {
    emit({
      partitionKey: encoded.partitionKey,
      explicitHashKey: encoded.ExplicitHashKey || null,
      data: encoded.data.toString('base64'),
    });
    done();
  }, () => {}, (err) => { console.error(err); process.exit(1); });
}

function deaggregate() {
  const event = JSON.parse(input);
  for (const r of event.Records) {
    agg.deaggregateSync(r.kinesis, true, (err, users) => {
      if (err) { console.error(`${r.kinesis.sequenceNumber}: ${err}`); process.exit(1); }
      for (const u of users) {
        emit({
          sequenceNumber: u.sequenceNumber,
          subSequenceNumber: u.subSequenceNumber === undefined ? null : u.subSequenceNumber,
          partitionKey: u.partitionKey === undefined ? null : u.partitionKey,
          explicitHashKey: u.explicitPartitionKey === undefined ? null : u.explicitPartitionKey,
          data: u.data,
        });
      }
    });
  }
}

// The hash key Kinesis maps each user record to, as the module sends it: the ExplicitHashKey it
// puts on the aggregate of that one record, else (it sends none) what Kinesis computes from the
// partition key it puts: its MD5 as a 128-bit big-endian integer.
async function hashkey() {
  const crypto = require('crypto');
  for (const l of input.split('\n').filter((l) => l.trim())) {
    const u = JSON.parse(l);
    const r = { partitionKey: u.partitionKey, data: Buffer.from('x') };
    if (u.explicitHashKey !== null && u.explicitHashKey !== undefined) r.explicitHashKey = u.explicitHashKey;
    await new Promise((resolve, reject) => {
      agg.aggregate([r], (encoded, done) => {
        const md5 = crypto.createHash('md5').update(encoded.partitionKey, 'utf8').digest('hex');
        emit({ hashKey: encoded.ExplicitHashKey || BigInt('0x' + md5).toString() });
        done();
      }, resolve, reject);
    });
  }
}

({ aggregate, deaggregate, hashkey })[process.argv[2]]();
