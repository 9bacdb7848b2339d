package redistest_test

import (
	"context"
	"testing"
	"time"

	"github.com/redis/rueidis"
	"github.com/stretchr/testify/require"

	"github.com/outboxfn/outbox/shared/redistest"
	"github.com/outboxfn/outbox/shared/stream"
)

func TestAClusterServesEveryKeyAndSurvivesTheLossOfAPrimary(t *testing.T) {
	t.Parallel()
	start := time.Now()
	c := redistest.StartCluster(t, 3, 1)
	t.Logf("cluster of 6 nodes up in %s", time.Since(start))
	client, err := stream.NewClient(c.URL(), true)
	require.NoError(t, err)
	defer client.Close()
	ctx := context.Background()
	keys := []string{"a", "b", "c", "d", "e", "f", "g"}
	for _, k := range keys {
		require.NoError(t, client.Do(ctx, client.B().Set().Key(k).Value(k).Build()).Error())
	}
	listed, err := stream.Keys(ctx, client, "*", "")
	require.NoError(t, err)
	require.Equal(t, keys, listed, "a SCAN of every node lists every key once")

	// WAIT for the replica, so that the failover keeps the key; WAIT
	// has no key, so it goes on the connection to a's primary.
	require.NoError(t, client.Dedicated(func(c rueidis.DedicatedClient) error {
		for _, r := range c.DoMulti(ctx, c.B().Set().Key("a").Value("a").Build(), c.B().Wait().Numreplicas(1).Timeout(1000).Build()) {
			if err := r.Error(); err != nil {
				return err
			}
		}
		return nil
	}))
	start = time.Now()
	old := c.Failover("a")
	t.Logf("failover in %s", time.Since(start))
	require.NotEqual(t, old, c.PrimaryOf("a"))
	got, err := client.Do(ctx, client.B().Get().Key("a").Build()).ToString()
	require.NoError(t, err)
	require.Equal(t, "a", got)
	old.Start()
	c.WaitHealthy()
}

func TestAClusterClientIsRefusedWhereThereIsNoCluster(t *testing.T) {
	t.Parallel()
	_, err := stream.NewClient(redistest.URL(), true)
	require.ErrorIs(t, err, stream.ErrNotCluster, "a single server is not a cluster")
	_, err = stream.NewClient("redis://127.0.0.1:6379/1", true)
	require.ErrorIs(t, err, stream.ErrClusterDB, "a cluster has database 0 only")
}
