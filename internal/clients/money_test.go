package clients

import (
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/llproxy/llproxy/internal/config"
	"github.com/llproxy/llproxy/internal/price"
)

func moneyClient(t *testing.T, perDay, perMonth float64) *Client {
	t.Helper()
	cfg := &config.Config{Clients: map[string]*config.Client{
		"team": {Keys: []config.Secret{"k"}, Weight: 1, Budget: &config.MoneyBudget{USDPerDay: perDay, USDPerMonth: perMonth}}}}
	c, ok := New(cfg).Identify("k")
	require.True(t, ok)
	return c
}

// A budget in money holds each request's most expensive outcome until it
// settles to its cost: over the budget by what is spent, Overspent until
// the reset that lets it fit; only because of holds, CashReserved.
func TestMoneyBudget(t *testing.T) {
	now := time.Date(2026, 12, 7, 15, 0, 0, 0, time.UTC)
	c := moneyClient(t, 1, 10) // $1 a day, $10 a month
	s1, err := c.Reserve(now, "m", 0, price.FromUSD(0.6))
	require.NoError(t, err)
	_, err = c.Reserve(now, "m", 0, price.FromUSD(0.5))
	var held *CashReserved
	require.ErrorAs(t, err, &held, "0.6 held + 0.5 > 1: only because of the hold")
	s1.Settle(now, 0, price.FromUSD(0.2))
	s2, err := c.Reserve(now, "m", 0, price.FromUSD(0.5))
	require.NoError(t, err, "settled to 0.2: 0.7 fits")
	s2.Settle(now, 0, price.FromUSD(0.5))
	_, err = c.Reserve(now, "m", 0, price.FromUSD(0.4))
	var over *Overspent
	require.ErrorAs(t, err, &over)
	assert.Equal(t, "day", over.Period)
	assert.Equal(t, time.Date(2026, 12, 8, 0, 0, 0, 0, time.UTC), over.ResetAt())
	assert.Contains(t, over.Error(), "client team has spent $0.70 of its $1.00 per day")
	// The next day it fits again; the month counts both days.
	s3, err := c.Reserve(now.Add(12*time.Hour), "m", 0, price.FromUSD(0.4))
	require.NoError(t, err)
	s3.Settle(now.Add(12*time.Hour), 0, price.FromUSD(0.4))
	day, month, _ := c.SpendNow(now.Add(12 * time.Hour))
	assert.Equal(t, price.FromUSD(0.4), day)
	assert.Equal(t, price.FromUSD(1.1), month)

	// The month binds: its reset (the 1st) is the one that lets it fit.
	m := moneyClient(t, 100, 1)
	sm, _ := m.Reserve(now, "m", 0, price.FromUSD(0.9))
	sm.Settle(now, 0, price.FromUSD(0.9))
	_, err = m.Reserve(now, "m", 0, price.FromUSD(0.2))
	require.ErrorAs(t, err, &over)
	assert.Equal(t, "month", over.Period)
	assert.Equal(t, time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC), over.ResetAt())
}

// 50 concurrent requests with random most-expensive outcomes, each
// settling to a random cost no more than that: the spend never passes the
// budget.
func TestMoneyBudgetNeverOverruns(t *testing.T) {
	for seed := range uint64(20) {
		c := moneyClient(t, 5, 0)
		now := time.Date(2026, 12, 7, 15, 0, 0, 0, time.UTC)
		var wg sync.WaitGroup
		for i := range 50 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, uint64(i)))
				for range 20 {
					most := price.Micro(rng.Int64N(600_000))
					s, err := c.Reserve(now, "m", 0, most)
					if err != nil {
						continue
					}
					s.Settle(now, 0, price.Micro(rng.Int64N(int64(most)+1)))
				}
			}()
		}
		wg.Wait()
		day, _, held := c.SpendNow(now)
		assert.LessOrEqual(t, day, price.FromUSD(5), "seed %d", seed)
		assert.Zero(t, held)
	}
}
