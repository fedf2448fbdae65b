// Shared by the Node clients of the transaction-pooling e2e test
// (e2e/txpool_clients_test.go): the run of TXPOOL_CONNS clients of
// TXPOOL_TXS transactions each, and the line each transaction prints. The
// connection settings are e2e/clients/node's (common.js).
'use strict';

const { config, main } = require('../node/common');

// tx prints one transaction's line: "tx<TAB>conn<TAB>i<TAB>kind<TAB>who<TAB>rows<TAB>pids".
function tx(c, i, k, w, rows, pids) {
  process.stdout.write(`tx\t${c}\t${i}\t${k}\t${w}\t${rows}\t${pids.join(',')}\n`);
}

// runClients runs client(c, txs) for every connection concurrently and
// exits non-zero if any failed, each failure on stderr.
function runClients(client) {
  main(async () => {
    const conns = Number(process.env.TXPOOL_CONNS);
    const txs = Number(process.env.TXPOOL_TXS);
    const results = await Promise.allSettled(Array.from({ length: conns }, (_, c) => client(c, txs)));
    let failed = 0;
    results.forEach((r, c) => {
      if (r.status === 'rejected') {
        console.error(`conn ${c}:`, r.reason);
        failed++;
      }
    });
    if (failed > 0) {
      throw new Error(`${failed} of ${conns} connections failed`);
    }
  });
}

module.exports = { config, tx, runClients };
