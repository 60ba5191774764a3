// The official Node deaggregator doing the handler's work on each event file: parse the JSON,
// deaggregate (base64 + MD5 + protobuf), read every user record's bytes, build the response.
// Prints one JSON line per file with the median of 30 runs (after 3 warm-ups).
'use strict';
const fs = require('fs');
const agg = require('aws-kinesis-agg');

for (const path of process.argv.slice(2)) {
  const body = fs.readFileSync(path);
  const times = [];
  let n = 0;
  for (let run = 0; run < 33; run++) {
    const start = process.hrtime.bigint();
    const event = JSON.parse(body);
    n = 0;
    for (const r of event.Records) {
      agg.deaggregateSync(r.kinesis, true, (err, users) => {
        if (err) throw err;
        for (const u of users) { Buffer.from(u.data, 'base64'); n++; }
      });
    }
    JSON.stringify({ batchItemFailures: [] });
    if (run >= 3) times.push(Number(process.hrtime.bigint() - start) / 1e6);
  }
  times.sort((a, b) => a - b);
  console.log(JSON.stringify({ file: path, median_ms: times[Math.floor(times.length / 2)], user_records: n }));
}
